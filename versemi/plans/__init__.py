"""Dataset fingerprints and the joint experiment plan (the card's versemi_plans)."""
