"""Runs every CUDA kernel of fused_adagrad once, on small tensors: the program tests/gpu.sh runs
under compute-sanitizer, where each launch is checked and slow.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python tests/python/cuda_every_kernel_once.py

PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives each tensor a cudaMalloc of its own, so that memcheck sees
an access past a tensor's end; with torch's caching allocator it would land in a neighbour within
the same cached block and pass unseen.

What runs (cuda/*.cu):
* increment_steps_kernel before every step: its long list eagerly, its short one in the graph.
* adagrad_kernel for float32, float64, float16 and bfloat16 (complex64 through float32's), with
  the 32 KB argument table eagerly and the 4 KB one in the graph; a float lr, a float32 and a
  float64 lr tensor on the device; weight decay, maximize and eps inside the sqrt; a 0-d tensor,
  odd sizes, a tensor of several chunks, a param starting one element into its buffer (the
  element-wise path), more tensors than one table holds, and (in the graph) a tensor continued in
  the next table. The op also steps a CPU step tensor (counted on the host) and a float64 one on
  the device (counted in a float32 copy), as torch.optim.Adagrad checkpoints bring them.
* sparse_adagrad_kernel for each dtype: nn.Embedding(sparse=True) grads with repeated indices,
  rows shorter and longer than a warp.
* rowwise_dense_kernel and rowwise_sparse_kernel for each dtype (RowWiseAdagrad).
* bags_step_kernel for each dtype, element-wise and row-wise (FusedEmbeddingBags' backward):
  repeated ids, a padding id, an empty bag and a table no id touches; mean, then sum with
  per_sample_weights.
* torch.amp.GradScaler's protocol in both optimizers, sparse grads included: a step that unscales
  the grads (grad_scale), then one the scaler found an inf for (found_inf: nothing changes).
* a FusedAdagrad step captured in a torch.cuda.CUDAGraph and replayed.

It checks the step counts, so that a path that silently did not run shows; whether the numbers
are right is for test_cuda.py and test_cuda_embeddings.py. A plain script: pytest does not collect
it (no test_ prefix).
"""
import sys

import torch

import fused_adagrad
from fused_adagrad import FusedAdagrad, FusedEmbeddingBags, RowWiseAdagrad

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF_AND_FLOAT = [torch.float32, torch.bfloat16, torch.float16]


def randn(shape, dtype, device):
    return torch.randn(shape, device=device).to(dtype)


def set_grads(params):
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def assert_steps(opt, params, expected):
    """Every param's step count is `expected` (one device read for all of them)."""
    steps = torch.stack([opt.state[p]["step"].to(params[0].device, torch.float32) for p in params])
    assert bool((steps == expected).all()), f"step counts {steps.tolist()}, expected {expected}"


def embeddings(dtype, device):
    """Two tables, rows of 13 and 40 elements (a warp covers 32), and their loss on a batch whose
    indices repeat, in no order: the sparse grads nn.Embedding(sparse=True) makes of it are
    uncoalesced."""
    tables = [torch.nn.Embedding(50, 13, sparse=True), torch.nn.Embedding(30, 40, sparse=True)]
    tables = [t.to(device=device, dtype=dtype) for t in tables]
    ids = torch.tensor([3, 7, 3, 0, 29, 7, 7, 12], device=device)
    return tables, lambda: sum(t(ids).float().square().sum() for t in tables)


def sparse_grads(device):
    """Both tables in every dtype, with their sparse grads."""
    weights = []
    for dtype in DTYPES:
        tables, loss = embeddings(dtype, device)
        loss().backward()
        weights += [t.weight for t in tables]
    assert all(w.grad.is_sparse for w in weights)
    return weights


def dense_steps(device, launch):
    chunk = launch["chunk_elements"]
    shapes = [(), (1,), (17,), (1023,), (33, 7), (2 * chunk + 3,)]
    each_dtype = [randn(s, dtype, device) for dtype in DTYPES + [torch.complex64] for s in shapes]
    one_element_in = torch.empty(1025, device=device)[1:].normal_()  # 4 bytes past alignment
    table_tensors = max(launch["large_table_tensors"], launch["small_table_tensors"])
    many = [randn((n % 97 + 1,), torch.float32, device)
            for n in range(table_tensors + 44)]  # more tensors than one table holds
    lr_f32 = [randn(s, dtype, device) for dtype in HALF_AND_FLOAT for s in shapes[:5]]
    lr_f64 = [randn((17,), torch.float16, device), randn((33, 7), torch.float64, device)]
    opt = FusedAdagrad([
        {"params": each_dtype + [one_element_in] + many},
        {"params": lr_f32, "lr": torch.tensor(0.02, device=device), "maximize": True,
         "eps_inside_sqrt": True},
        {"params": lr_f64, "lr": torch.tensor(0.03, dtype=torch.float64, device=device),
         "weight_decay": 0.0},
    ], lr=0.05, lr_decay=0.01, weight_decay=0.01)
    params = set_grads(each_dtype + [one_element_in] + many + lr_f32 + lr_f64)
    opt.step()
    assert_steps(opt, params, 1)

    ps = [randn((1023,), torch.float32, device), randn((33, 7), torch.bfloat16, device)]
    steps = [torch.zeros(()), torch.zeros((), dtype=torch.float64, device=device)]
    torch.ops.fused_adagrad.adagrad_step_(
        ps, [torch.randn_like(p) for p in ps], [torch.zeros_like(p) for p in ps], steps,
        lr=0.05, lr_decay=0.01, weight_decay=0.0, eps=1e-10, maximize=False)
    assert [float(s) for s in steps] == [1.0, 1.0]


def sparse_steps(device):
    weights = sparse_grads(device)
    opt = FusedAdagrad(weights, lr=0.05, lr_decay=0.01, maximize=True)
    opt.step()
    assert_steps(opt, weights, 1)


def rowwise_steps(device):
    dense = set_grads([randn(s, dtype, device) for dtype in DTYPES
                       for s in [(), (300,), (64, 1), (40, 13), (7, 3, 5)]])
    sparse = sparse_grads(device)
    lr_tensor = set_grads([randn((40, 13), torch.float32, device),
                           randn((64, 1), torch.float16, device)])
    opt = RowWiseAdagrad([
        {"params": dense + sparse},
        {"params": lr_tensor, "lr": torch.tensor(0.02, device=device), "eps_inside_sqrt": True},
    ], lr=0.05, weight_decay=0.01)
    opt.step()
    assert_steps(opt, dense + sparse + lr_tensor, 1)


def embedding_bag_steps(device):
    """Three tables (rows of 13, 40 and 1 elements) in two bags: table 0 gets [3, 7, 3] and
    [0 (its padding_idx), 7, 7], table 1 [12] and an empty bag, table 2 nothing."""
    tables = [(50, 13), (30, 40), (5, 1)]
    ids = torch.tensor([3, 7, 3, 0, 7, 7, 12], device=device)
    offsets = torch.tensor([0, 3, 6, 7, 7, 7], device=device)
    for dtype in DTYPES:
        for optimizer in ("adagrad", "rowwise"):
            for mode in ("mean", "sum"):
                psw = randn((len(ids),), dtype, device) if mode == "sum" else None
                bags = FusedEmbeddingBags(tables, mode=mode, optimizer=optimizer, dtype=dtype,
                                          device=device, padding_idx=[0, None, None],
                                          weight_decay=0.01 if optimizer == "rowwise" else 0.0)
                bags(ids, offsets, psw).float().square().sum().backward()
                bags.optimizer.step()
                assert_steps(bags.optimizer, list(bags.weights), 1)


def scaled_steps(device):
    """Two scaler steps of each optimizer: one it unscales, then one with an inf in a grad, which
    the scaler reports as found_inf and which must change nothing (the step counts stay at 1)."""
    # torch's GradScaler checks and unscales float16 and float32 grads on CUDA, not bfloat16.
    scalable = [torch.float32, torch.float16]
    dense = [randn(s, dtype, device).requires_grad_() for dtype in scalable
             for s in [(17,), (33, 7)]]
    rows = [randn(s, dtype, device).requires_grad_() for dtype in scalable
            for s in [(40, 13), (300,)]]
    (table, row_table), table_loss = embeddings(torch.float32, device)
    opts = [FusedAdagrad(dense + [table.weight], lr=0.05),
            RowWiseAdagrad(rows + [row_table.weight], lr=0.05, weight_decay=0.01)]
    scaler = torch.amp.GradScaler(device.type, init_scale=256.0)
    for step in range(2):
        for opt in opts:
            opt.zero_grad()
        loss = sum((p.float() * 0.5).square().sum() for p in dense + rows) + table_loss()
        scaler.scale(loss).backward()
        if step == 1:
            dense[0].grad.view(-1)[0] = float("inf")
            rows[0].grad.view(-1)[0] = float("inf")
        for opt in opts:
            scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 128.0, "the scaler did not see the inf"
    assert_steps(opts[0], dense + [table.weight], 1)
    assert_steps(opts[1], rows + [row_table.weight], 1)


def captured_steps(device, launch):
    """One step captured and replayed twice. Under capture the step takes the 4 KB tables: 40
    tensors per dtype fill one and start the next, and the float32 tensor of one chunk more than
    a table holds is continued in the next one. Nothing is allocated during the capture (with
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 an allocation there would be a cudaMalloc, which a capture
    refuses)."""
    chunk = launch["chunk_elements"]
    small = [(), (17,), (1023,), (33, 7)] * 10
    params = [randn(s, dtype, device) for dtype in HALF_AND_FLOAT for s in small]
    params.append(randn(((launch["small_table_chunks"] + 1) * chunk + 5,), torch.float32, device))
    opt = FusedAdagrad(params, lr=torch.tensor(0.05, device=device), lr_decay=0.01,
                       weight_decay=0.01)
    for p in params:
        p.grad = torch.zeros_like(p)  # static grads: the graph reads them at these addresses

    def new_grads():
        for p in params:
            p.grad.normal_()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # a warm-up step outside the capture, as torch.cuda.graph asks
        new_grads()
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(2):
        new_grads()
        graph.replay()
    assert_steps(opt, params, 3)


def main():
    if not torch.cuda.is_available():
        sys.exit("cuda_every_kernel_once: no CUDA device (torch.cuda.is_available() is False)")
    info = fused_adagrad.build_info()
    if not info["cuda"]:
        sys.exit("cuda_every_kernel_once: fused_adagrad was built without CUDA "
                 "(build_info()['cuda'] is False)")
    launch = info["cuda_launch"]
    # Without them (a CUDA runtime or driver before 12.1) eager steps take the 4 KB tables too.
    eager_tables = "32 KB" if launch["large_tables_usable"] else "4 KB"
    print(f"fused-adagrad {info['version']}, CUDA kernels for {info['cuda_archs']}; torch "
          f"{torch.__version__} on {torch.cuda.get_device_name()}; {eager_tables} tables eagerly",
          flush=True)
    torch.manual_seed(0)
    device = torch.device("cuda")
    for name, run in [("dense", lambda: dense_steps(device, launch)),
                      ("sparse", lambda: sparse_steps(device)),
                      ("row-wise", lambda: rowwise_steps(device)),
                      ("embedding bag", lambda: embedding_bag_steps(device)),
                      ("GradScaler", lambda: scaled_steps(device)),
                      ("CUDA graph", lambda: captured_steps(device, launch))]:
        run()
        print(f"{name} steps: done", flush=True)
    torch.cuda.synchronize()
    print("every CUDA kernel ran once")


if __name__ == "__main__":
    main()
