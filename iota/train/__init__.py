"""Training pieces every role shares, so miners, validators and the baseline compute the same thing."""
