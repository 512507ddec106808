"""Learning floor: the projections (hinge and listwise losses) and training through the stacked loss."""
