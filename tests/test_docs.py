"""The README's code example runs as written."""

import re

import torch

from fairseq_helpers import REPO


def test_readme_module_example_runs():
    text = (REPO / "README.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "ClusterAttention" in b]
    torch.manual_seed(0)
    B, N, T = 2, 12, 5
    namespace = {
        "x": torch.randn(B, N, 512),
        "key_padding_mask": torch.tensor([[False] * N, [True] * 3 + [False] * (N - 3)]),
        "y": torch.randn(B, T, 512),
        "T": T,
        "task_loss": torch.zeros(()),
    }
    exec(compile(code, "README.md", "exec"), namespace)
    loss, out, outs = namespace["loss"], namespace["out"], namespace["y_t"]
    assert torch.isfinite(loss) and loss.requires_grad
    # The causal full forward's last position equals the last incremental step.
    torch.testing.assert_close(outs[:, 0], out[:, T - 1], atol=1e-5, rtol=1e-5)
    assert namespace["readable"].impl == "reference"
