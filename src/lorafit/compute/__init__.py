"""The compute layer shared by training, evaluation and adapters: precision, block tensors, the
fused loss and objective, token-weighted loss evaluation and greedy generation. It imports only
data, model and the ground floor, never the stages above it."""
