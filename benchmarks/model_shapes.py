"""Parameter lists the benchmarks share, built from shapes (no download needed)."""
import torch


def bert_base_shapes():
    h, ffn, vocab, layers = 768, 3072, 30522, 12
    shapes = [(vocab, h), (512, h), (2, h), (h,), (h,)]  # embeddings + LayerNorm
    for _ in range(layers):
        shapes += [(h, h), (h,)] * 4  # q, k, v, attention output
        shapes += [(h,), (h,)]  # LayerNorm
        shapes += [(ffn, h), (ffn,), (h, ffn), (h,)]  # feed-forward
        shapes += [(h,), (h,)]  # LayerNorm
    shapes += [(h, h), (h,)]  # pooler
    return shapes


def small_shapes(n=1000):
    gen = torch.Generator().manual_seed(0)
    return [(int(s),) for s in torch.randint(64, 4096, (n,), generator=gen)]
