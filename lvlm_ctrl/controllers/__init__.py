"""Controllers map (question, budget_ms) to a configuration of the knob space.

Every controller has `bind(backbone)` (learn the knob space it serves) and
`decide(sample, budget_ms) -> Knobs`; evaluation times `decide` as the controller's overhead.
"""
