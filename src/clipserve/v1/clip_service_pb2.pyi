from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]

class EmbeddingFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMBEDDING_FORMAT_UNSPECIFIED: _ClassVar[EmbeddingFormat]
    EMBEDDING_FORMAT_FLOAT: _ClassVar[EmbeddingFormat]
    EMBEDDING_FORMAT_FP32_BYTES: _ClassVar[EmbeddingFormat]
    EMBEDDING_FORMAT_FP16_BYTES: _ClassVar[EmbeddingFormat]

class Truncation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_UNSPECIFIED: _ClassVar[Truncation]
    TRUNCATION_END: _ClassVar[Truncation]
    TRUNCATION_NONE: _ClassVar[Truncation]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_FLOAT16: DataType
EMBEDDING_FORMAT_UNSPECIFIED: EmbeddingFormat
EMBEDDING_FORMAT_FLOAT: EmbeddingFormat
EMBEDDING_FORMAT_FP32_BYTES: EmbeddingFormat
EMBEDDING_FORMAT_FP16_BYTES: EmbeddingFormat
TRUNCATION_UNSPECIFIED: Truncation
TRUNCATION_END: Truncation
TRUNCATION_NONE: Truncation

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DataType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DataType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "tensor", "url")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    tensor: Tensor
    url: str
    def __init__(self, data: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., url: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values", "raw")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    raw: bytes
    def __init__(self, values: _Optional[_Iterable[float]] = ..., raw: _Optional[bytes] = ...) -> None: ...

class EncodeImageRequest(_message.Message):
    __slots__ = ("images", "format")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    format: EmbeddingFormat
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., format: _Optional[_Union[EmbeddingFormat, str]] = ...) -> None: ...

class EncodeImageResponse(_message.Message):
    __slots__ = ("embeddings", "dim", "format")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dim: int
    format: EmbeddingFormat
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dim: _Optional[int] = ..., format: _Optional[_Union[EmbeddingFormat, str]] = ...) -> None: ...

class EncodeTextRequest(_message.Message):
    __slots__ = ("texts", "format", "truncation")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    format: EmbeddingFormat
    truncation: Truncation
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., format: _Optional[_Union[EmbeddingFormat, str]] = ..., truncation: _Optional[_Union[Truncation, str]] = ...) -> None: ...

class EncodeTextResponse(_message.Message):
    __slots__ = ("embeddings", "dim", "format", "token_counts")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dim: int
    format: EmbeddingFormat
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dim: _Optional[int] = ..., format: _Optional[_Union[EmbeddingFormat, str]] = ..., token_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("images", "labels", "templates", "top_k")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    labels: _containers.RepeatedScalarFieldContainer[str]
    templates: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., labels: _Optional[_Iterable[str]] = ..., templates: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "index", "probability", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    probability: float
    score: float
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., probability: _Optional[float] = ..., score: _Optional[float] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("labels",)
    LABELS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedCompositeFieldContainer[LabelScore]
    def __init__(self, labels: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("classifications",)
    CLASSIFICATIONS_FIELD_NUMBER: _ClassVar[int]
    classifications: _containers.RepeatedCompositeFieldContainer[Classification]
    def __init__(self, classifications: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ...) -> None: ...

class RankItem(_message.Message):
    __slots__ = ("text", "image")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: Image
    def __init__(self, text: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("query", "candidates", "top_k")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    query: RankItem
    candidates: _containers.RepeatedCompositeFieldContainer[RankItem]
    top_k: int
    def __init__(self, query: _Optional[_Union[RankItem, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[RankItem, _Mapping]]] = ..., top_k: _Optional[int] = ...) -> None: ...

class RankedCandidate(_message.Message):
    __slots__ = ("index", "score", "probability")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    probability: float
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ..., probability: _Optional[float] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("candidates",)
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[RankedCandidate]
    def __init__(self, candidates: _Optional[_Iterable[_Union[RankedCandidate, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BatchingInfo(_message.Message):
    __slots__ = ("max_batch_size", "max_queue_delay_us", "max_queue_size", "batch_buckets", "length_buckets", "instances")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_US_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_queue_delay_us: int
    max_queue_size: int
    batch_buckets: _containers.RepeatedScalarFieldContainer[int]
    length_buckets: _containers.RepeatedScalarFieldContainer[int]
    instances: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queue_delay_us: _Optional[int] = ..., max_queue_size: _Optional[int] = ..., batch_buckets: _Optional[_Iterable[int]] = ..., length_buckets: _Optional[_Iterable[int]] = ..., instances: _Optional[int] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_name", "pretrained", "embedding_dim", "image_size", "context_length", "precision", "execution_provider", "vision_batching", "text_batching", "logit_scale", "logit_bias", "default_templates", "server_version", "image_mean", "image_std", "interpolation", "resize_mode", "max_items_per_request", "max_labels")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    PRETRAINED_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    VISION_BATCHING_FIELD_NUMBER: _ClassVar[int]
    TEXT_BATCHING_FIELD_NUMBER: _ClassVar[int]
    LOGIT_SCALE_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_MEAN_FIELD_NUMBER: _ClassVar[int]
    IMAGE_STD_FIELD_NUMBER: _ClassVar[int]
    INTERPOLATION_FIELD_NUMBER: _ClassVar[int]
    RESIZE_MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_LABELS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    pretrained: str
    embedding_dim: int
    image_size: int
    context_length: int
    precision: str
    execution_provider: str
    vision_batching: BatchingInfo
    text_batching: BatchingInfo
    logit_scale: float
    logit_bias: float
    default_templates: _containers.RepeatedScalarFieldContainer[str]
    server_version: str
    image_mean: _containers.RepeatedScalarFieldContainer[float]
    image_std: _containers.RepeatedScalarFieldContainer[float]
    interpolation: str
    resize_mode: str
    max_items_per_request: int
    max_labels: int
    def __init__(self, model_name: _Optional[str] = ..., pretrained: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., image_size: _Optional[int] = ..., context_length: _Optional[int] = ..., precision: _Optional[str] = ..., execution_provider: _Optional[str] = ..., vision_batching: _Optional[_Union[BatchingInfo, _Mapping]] = ..., text_batching: _Optional[_Union[BatchingInfo, _Mapping]] = ..., logit_scale: _Optional[float] = ..., logit_bias: _Optional[float] = ..., default_templates: _Optional[_Iterable[str]] = ..., server_version: _Optional[str] = ..., image_mean: _Optional[_Iterable[float]] = ..., image_std: _Optional[_Iterable[float]] = ..., interpolation: _Optional[str] = ..., resize_mode: _Optional[str] = ..., max_items_per_request: _Optional[int] = ..., max_labels: _Optional[int] = ...) -> None: ...
