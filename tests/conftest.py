import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "vllm_seams: the plugin's seams into vLLM's Python code, below any engine; "
        "scripts/test_releases.sh runs them against each supported release's sources")

from pio_fvlm_vllm.algorithm import DecoderLayerWeights, DecoderShape, ProxyWeights


def random_proxy(num_layers=2, hidden=32, heads=4, kv_heads=2, inter=64, vocab=50, seed=0,
                 dtype=torch.float64, bias=False) -> ProxyWeights:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    shape = DecoderShape(hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
                         head_dim=hidden // heads, rms_norm_eps=1e-6, rope_theta=10000.0)
    hd = hidden // heads
    layers = [
        DecoderLayerWeights(
            input_norm=1 + r(hidden, scale=0.05), q_proj=r(heads * hd, hidden),
            k_proj=r(kv_heads * hd, hidden), v_proj=r(kv_heads * hd, hidden),
            o_proj=r(hidden, heads * hd), post_norm=1 + r(hidden, scale=0.05),
            gate_proj=r(inter, hidden), up_proj=r(inter, hidden), down_proj=r(hidden, inter),
            # Qwen2-style q/k/v biases
            q_bias=r(heads * hd) if bias else None, k_bias=r(kv_heads * hd) if bias else None,
            v_bias=r(kv_heads * hd) if bias else None,
        )
        for _ in range(num_layers)
    ]
    return ProxyWeights(shape=shape, layers=layers, final_norm=1 + r(hidden, scale=0.05),
                        lm_head=r(vocab, hidden, scale=0.5))


@pytest.fixture
def proxy():
    return random_proxy()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from pio_fvlm_vllm.checkpoints import build

    return build("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")
