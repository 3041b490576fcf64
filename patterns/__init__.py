"""The declarative pattern table (``TABLE``): every rewrite the fuse pass may make.

Rows are added by the modules below, one per op family; a duplicate name is an error.
Each row: pattern/replacement functions, a named pure guard, a one-line comment.
"""
from fusepass.patterns.table import Match, Rule, Table
from fusepass.patterns import binary, epilogues
from fusepass.patterns import folding, quantized, quantized_passthrough

TABLE = Table()
TABLE.extend(binary.ROWS)  # conv/linear(x) (+) t -> fused binary post-op
TABLE.extend(epilogues.ROWS)  # conv/linear(x) -> eltwise(y): fused post-op
TABLE.extend(folding.ROWS)  # conv/linear(x) then BN or (+-*/ constant) -> folded W, b (fold passes)
TABLE.extend(quantized_passthrough.ROWS)  # int8 pooling/views/cat on the int8 tensor (fuse_int8)
TABLE.extend(quantized.ROWS)  # dequantize -> conv/linear -> [quantize]: int8 ops (fuse_int8 pass)

__all__ = ["TABLE", "Match", "Rule", "Table"]
