"""The branch kinds the residual pass labels and policies select by."""

SELF_ATTENTION = "self_attention"
CROSS_ATTENTION = "cross_attention"
TEMPORAL_ATTENTION = "temporal_attention"
JOINT_ATTENTION = "joint_attention"  # text and image tokens attend together (MMDiT, CogVideoX, Flux)
MLP = "mlp"

KINDS = (SELF_ATTENTION, CROSS_ATTENTION, TEMPORAL_ATTENTION, JOINT_ATTENTION, MLP)
