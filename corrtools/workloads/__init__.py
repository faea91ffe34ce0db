"""Built-in CPU-sized training workloads whose data is made on the machine (no download)."""
from corrtools.workloads.charlm import CharLMConfig, CharLMWorkload, CharTransformer

__all__ = ["CharLMConfig", "CharLMWorkload", "CharTransformer"]
