"""Examples in one order everywhere: dataset files, registered datasets, batches held in
memory or streamed from files, all drawn in the same seeded order."""

from slt.data.datasets import DATASETS, load_data
from slt.data.files import data_root, read_cifar_pickle, read_idx
from slt.data.images import STREAMS
from slt.data.loader import open_batches
from slt.data.memory import Batches
from slt.data.order import BatchSource, epoch_order, rank_slice
from slt.data.splits import Splits, channel_stats
from slt.data.stream import StreamBatches

__all__ = ["BatchSource", "Batches", "DATASETS", "STREAMS", "Splits", "StreamBatches",
           "channel_stats", "data_root", "epoch_order", "load_data", "open_batches", "rank_slice",
           "read_cifar_pickle", "read_idx"]
