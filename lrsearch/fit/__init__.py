"""Training: trials of a study, alone or many at once (a trial array), in one Lightning fit;
the stacked network, its batched optimizer, each member's pruning checks and metrics,
population-based training's exploits; the learning-rate range test."""
