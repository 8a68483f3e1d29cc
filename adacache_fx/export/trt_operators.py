"""TensorRT's ONNX parser: which ONNX operators it imports, as data (read by ``check_tensorrt_support``).

Source: the operator support matrix of the onnx-tensorrt project, repository ``onnx/onnx-tensorrt``,
file ``docs/operators.md``, the version headed "TensorRT 10.15 supports operators in the inclusive
range of opset 9 to opset 24" (read from a public code index whose copy did not name its commit; the
same file at commit 6d0ab7be324d02c7feb3a306b6fdbeae84f71ddc is the older TensorRT 8.5 table).
Restrictions are paraphrased from that table, kept only where they can matter for exported DiT graphs
or name an input that must be constant. The table lags releases and plugins can add operators: the
parser of the TensorRT actually installed is the final word (``ax.export.tensorrt`` reports its errors).
"""

from __future__ import annotations

SOURCE = "onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15 table)"
TENSORRT_VERSION = "10.15"
OPSET_RANGE = (9, 24)  # default-domain opsets the parser accepts

# Operators marked supported ("Y"), with the table's restriction when it states one (else None).
SUPPORTED: tuple[tuple[str, str | None], ...] = (
    ("Abs", None), ("Acos", None), ("Acosh", None), ("Add", None), ("And", None),
    ("ArgMax", None), ("ArgMin", None), ("Asin", None), ("Asinh", None), ("Atan", None), ("Atanh", None),
    ("Attention", "Q, K, V and attn_mask must be 4-D; past_key/past_value/nonpad_kv_seqlen inputs, "
                  "present_key/present_value/qk_matmul_output outputs, qk_matmul_output_mode and softcap "
                  "are unsupported"),
    ("AveragePool", "2-D or 3-D pooling only; dilations empty or all ones"),
    ("BatchNormalization", None), ("BlackmanWindow", None), ("Cast", None), ("CastLike", None),
    ("Ceil", None), ("Celu", None), ("Clip", None), ("Concat", None),
    ("Constant", "sparse_value and string values are unsupported"), ("ConstantOfShape", None),
    ("Conv", None), ("ConvTranspose", None), ("Cos", None), ("Cosh", None),
    ("CumSum", "axis must be a build-time constant"),
    ("DeformConv", "1-D or 2-D spatial input; equal begin/end pads per axis"),
    ("DepthToSpace", None), ("DequantizeLinear", "x_zero_point must be zero"), ("Div", None),
    ("Dropout", "is_training must be an initializer that is False"),
    ("Einsum", None), ("Elu", None), ("Equal", None), ("Erf", None), ("Exp", None), ("Expand", None),
    ("EyeLike", "input must have static dimensions"), ("Flatten", None), ("Floor", None),
    ("Gather", None), ("GatherElements", None), ("GatherND", None), ("Gelu", None), ("Gemm", None),
    ("GlobalAveragePool", None), ("GlobalLpPool", None), ("GlobalMaxPool", None),
    ("Greater", None), ("GreaterOrEqual", None), ("GridSample", "input must be 4-D"),
    ("GroupNormalization", None),
    ("GRU", "bidirectional GRUs need the same activations both ways"),
    ("HammingWindow", None), ("HannWindow", None), ("HardSigmoid", None), ("HardSwish", None),
    ("Hardmax", "the axis dimension must be a build-time constant"), ("Identity", None),
    ("If", "the two branches' outputs must have the same rank and different names"),
    ("ImageScaler", None), ("InstanceNormalization", None), ("IsInf", None), ("IsNaN", None),
    ("LayerNormalization", "only the first output (Y) is supported"),
    ("LeakyRelu", None), ("Less", None), ("LessOrEqual", None), ("Log", None), ("LogSoftmax", None),
    ("Loop", "scan output length cannot be dynamic; loop-carried shapes must not change across iterations"),
    ("LRN", None),
    ("LSTM", "bidirectional LSTMs need the same activations both ways; input_forget and layout must be 0"),
    ("LpNormalization", None), ("LpPool", "dilations empty or all ones"), ("MatMul", None), ("Max", None),
    ("MaxPool", "2-D or 3-D pooling only; no Indices output; dilations empty or all ones"),
    ("Mean", None), ("MeanVarianceNormalization", None), ("Min", None), ("Mish", None), ("Mod", None),
    ("Mul", None), ("Neg", None), ("NonMaxSuppression", None), ("NonZero", None), ("Not", None),
    ("OneHot", "depth must be a build-time constant"), ("Or", None), ("Pad", None),
    ("ParametricSoftplus", None), ("Pow", None), ("PRelu", None),
    ("QuantizeLinear", "y_zero_point must be 0"),
    ("RandomNormal", "seed is ignored"), ("RandomNormalLike", "seed is ignored"),
    ("RandomUniform", "seed is ignored"), ("RandomUniformLike", "seed is ignored"),
    ("Range", None), ("Reciprocal", None),
    ("ReduceL1", "axes must be an initializer"), ("ReduceL2", "axes must be an initializer"),
    ("ReduceLogSum", "axes must be an initializer"), ("ReduceLogSumExp", "axes must be an initializer"),
    ("ReduceMax", "axes must be an initializer"), ("ReduceMean", "axes must be an initializer"),
    ("ReduceMin", "axes must be an initializer"), ("ReduceProd", "axes must be an initializer"),
    ("ReduceSum", "axes must be an initializer"), ("ReduceSumSquare", "axes must be an initializer"),
    ("Relu", None), ("Reshape", None),
    ("Resize", "coordinate modes half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric, "
               "align_corners; modes nearest and linear; aspect ratio policy stretch; no antialiasing"),
    ("ReverseSequence", None), ("RMSNormalization", None),
    ("RNN", "bidirectional RNNs need the same activations both ways"), ("RoiAlign", None),
    ("RotaryEmbedding", "position_ids must be INT64"), ("Round", None),
    ("STFT", "frame_step and window must be initializers; real input only"),
    ("ScaledTanh", None), ("Scan", None), ("Scatter", None), ("ScatterElements", None),
    ("ScatterND", "reduction must be none"), ("Selu", None), ("Shape", None), ("Shrink", None),
    ("Sigmoid", None), ("Sign", None), ("Sin", None), ("Sinh", None), ("Size", None), ("Slice", None),
    ("Softmax", None), ("Softplus", None), ("Softsign", None), ("SpaceToDepth", None), ("Split", None),
    ("Sqrt", None), ("Squeeze", "axes must be resolvable to a constant"), ("Sub", None), ("Sum", None),
    ("Tan", None), ("Tanh", None), ("TensorScatter", "past_cache and update must be 4-D; axis must be -2"),
    ("ThresholdedRelu", None), ("Tile", None), ("TopK", "sorted must be 1; K below 3840"),
    ("Transpose", None), ("Trilu", None), ("Unsqueeze", "axes must be resolvable to a constant"),
    ("Upsample", None), ("Where", None), ("Xor", None),
)

# Operators the table marks unsupported ("N").
UNSUPPORTED: tuple[str, ...] = (
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor",
    "Col2Im", "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det",
    "DynamicQuantizeLinear", "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool",
    "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement",
    "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch", "SequenceAt",
    "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
    "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat", "StringNormalizer",
    "StringSplit", "TfIdfVectorizer", "Unique",
)

# ONNX tensor element types (onnx.TensorProto names) TensorRT takes; DOUBLE is cast down to FLOAT.
DATA_TYPES: tuple[str, ...] = (
    "FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE", "INT32", "INT64", "INT8", "UINT8", "INT4", "BOOL",
    "FLOAT8E4M3FN", "FLOAT4E2M1",
)

# Which input of an operator the table requires to be constant, for the checks that can be made on
# the graph (input index, what the table says).
CONSTANT_INPUTS: tuple[tuple[str, int], ...] = (
    ("Squeeze", 1), ("Unsqueeze", 1), ("CumSum", 1), ("OneHot", 1), ("Dropout", 2),
    ("ReduceL1", 1), ("ReduceL2", 1), ("ReduceLogSum", 1), ("ReduceLogSumExp", 1), ("ReduceMax", 1),
    ("ReduceMean", 1), ("ReduceMin", 1), ("ReduceProd", 1), ("ReduceSum", 1), ("ReduceSumSquare", 1),
)

# An older table worth knowing when the installed TensorRT is old: onnx/onnx-tensorrt
# docs/operators.md at commit 6d0ab7be324d02c7feb3a306b6fdbeae84f71ddc (TensorRT 8.5, opsets up to
# 17) marks LayerNormalization unsupported, and every exported DiT graph uses it.
OLDER_RELEASE_NOTE = (
    "TensorRT 8.5's table (onnx/onnx-tensorrt docs/operators.md @ 6d0ab7be) accepts opsets up to 17 "
    "and marks LayerNormalization unsupported: use TensorRT 10"
)
