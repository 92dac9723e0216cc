"""Our sparse format: bitmask + kept values, exact round trip, and its size."""

from __future__ import annotations

import pytest
import torch

from dpruner_lightning.algorithms.masks import apply_mask_, select_mask
from dpruner_lightning.algorithms.targets import find_targets
from dpruner_lightning.export import SPARSE_FILE, load_sparse_model, pack_sparse, save_sparse_model, unpack_sparse

from .conftest import tiny_model


def test_pack_unpack_is_exact():
    torch.manual_seed(0)
    w = torch.randn(7, 13).to(torch.bfloat16)
    w[w.abs() < 0.5] = 0
    packed = pack_sparse(w)
    assert packed["bits"].dtype == torch.uint8 and packed["bits"].numel() == -(-w.numel() // 8)
    assert packed["values"].numel() == int((w != 0).sum())
    assert torch.equal(unpack_sparse(packed["bits"], packed["values"], packed["shape"]), w)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sparse_model_round_trip_and_size(tmp_path, family):
    model = tiny_model(family, dtype=torch.bfloat16)
    targets = find_targets(model)
    for t in targets.values():
        apply_mask_(t.weight_view(), select_mask(t.weight_view().float().abs(), 0.5))
    folder = save_sparse_model(model, list(targets), None, tmp_path / "sparse")
    reloaded = load_sparse_model(folder, dtype=torch.bfloat16)
    ids = torch.randint(0, 257, (2, 16))
    assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    # Bytes: targets cost 1/16 (bits) + 1/2 (values) of dense bf16; the rest stays dense.
    target_dense = sum(t.weight.numel() for t in targets.values()) * 2
    other = sum(p.numel() for n, p in model.named_parameters() if n[:-len(".weight")] not in targets) * 2
    expected = target_dense * (1 / 16 + 1 / 2) + other
    assert (folder / SPARSE_FILE).stat().st_size == pytest.approx(expected, rel=0.05)
