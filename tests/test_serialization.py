"""Loading a state dict: what is validated, and that a failed load changes nothing.

Every test builds a tiny wrapper on CPU, saves it, damages the saved state in one way and
checks the load raises one ``ValueError`` naming the objective and the field, with the
wrapper (objectives, counters, settings, base optimizer state) exactly as before.
"""

from __future__ import annotations

import copy
import io
import struct
import warnings
import zipfile

import pytest
import torch
from torch import nn

from gradsafe import ProtectedOptimizer, serialization

# StateDictError is new; the tests read it defensively so that they also run (and fail for
# the right reason) against code that has only ValueError.
StateDictError = getattr(serialization, "StateDictError", ValueError)

SHAPES = [(5, 3), (5,), (2, 5)]  # two matrices and a vector: every scope has a flat part


# ----------------------------------------------------------------------------- helpers
def make_params(seed: int = 0, shapes=SHAPES) -> list[nn.Parameter]:
    torch.manual_seed(seed)
    return [nn.Parameter(torch.randn(s)) for s in shapes]


def samples(params, m: int = 3, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(m)]


def set_grads(params, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def make_opt(params, base: str = "sgd", space: str = "grad", steps: int = 2, **options) -> ProtectedOptimizer:
    """A wrapper with objective "safety" (all parameters) that has taken ``steps`` steps."""
    if base == "sgd":
        inner = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    else:
        inner = torch.optim.AdamW(params, lr=0.01)
    opt = ProtectedOptimizer(inner, space=space, **options)
    opt.protect("safety", samples(params))
    for s in range(steps):
        set_grads(params, seed=10 + s)
        opt.step()
    return opt


def saved(opt: ProtectedOptimizer) -> dict:
    """A copy of the state dict (``state_dict()`` holds the live memory tensors, not copies)."""
    return copy.deepcopy(opt.state_dict())


def objective_state(sd: dict, name: str = "safety") -> dict:
    return sd["gradsafe"]["objectives"][name]


def fingerprint(opt: ProtectedOptimizer) -> dict:
    """Everything a load could change, deep-copied (compare with ``same``)."""
    return {
        "objectives": {n: (o, o.version, copy.deepcopy(o.state_dict())) for n, o in opt.objectives.items()},
        "steps": opt.gradsafe_steps,
        "space": opt.space,
        "defaults": opt.default_config,
        "base": copy.deepcopy(opt.base_optimizer.state_dict()),
    }


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:  # NaN
        return True
    return a is b or a == b


def assert_unchanged(opt: ProtectedOptimizer, before: dict) -> None:
    after = fingerprint(opt)
    assert after["objectives"].keys() == before["objectives"].keys()
    for name, (obj, version, state) in before["objectives"].items():
        obj2, version2, state2 = after["objectives"][name]
        assert obj2 is obj and version2 == version, name
        assert same(state2, state), name
    for key in ("steps", "space", "defaults"):
        assert after[key] == before[key], key
    assert same(after["base"], before["base"]), "the base optimizer's state changed"


def assert_load_fails(opt: ProtectedOptimizer, sd: dict, match: str) -> pytest.ExceptionInfo:
    """The load raises one ValueError matching ``match`` and changes nothing."""
    before = fingerprint(opt)
    with pytest.raises(ValueError, match=match) as info:
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)
    return info


# ----------------------------------------------------------------------------- 1. values
@pytest.mark.parametrize("scope", ["global", "tensor", "factored"])
def test_nan_in_basis_is_rejected_and_the_step_stays_finite(scope):
    params = make_params()
    opt = make_opt(params, scope=scope)
    sd = saved(opt)
    objective_state(sd)["basis"][0, 0] = float("nan")
    fresh_params = make_params()
    fresh = make_opt(fresh_params, scope=scope, steps=0)
    assert_load_fails(fresh, sd, r"objective 'safety': field 'basis' has 1 non-finite")
    set_grads(fresh_params)
    fresh.step()
    assert all(torch.isfinite(p).all() for p in fresh_params)


def test_inf_fisher_is_rejected():
    opt = make_opt(make_params(), damping=0.5)
    sd = saved(opt)
    objective_state(sd)["fisher"][3] = float("inf")
    assert_load_fails(opt, sd, r"objective 'safety': field 'fisher' has 1 non-finite entries")


def test_negative_fisher_is_rejected():
    opt = make_opt(make_params(), damping=0.5)
    sd = saved(opt)
    objective_state(sd)["fisher"][0] = -1.0
    assert_load_fails(opt, sd, r"objective 'safety': field 'fisher' has negative entries")


def test_nan_in_factored_reference_is_rejected():
    opt = make_opt(make_params(), scope="factored")
    sd = saved(opt)
    objective_state(sd)["factors"]["0"]["ref_left"][0, 0] = float("nan")
    assert_load_fails(opt, sd, r"objective 'safety': field \"factors\['0'\].ref_left\" has 1 non-finite")


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_non_orthonormal_basis_is_rejected(scope):
    opt = make_opt(make_params(), scope=scope)
    sd = saved(opt)
    objective_state(sd)["basis"][0] *= 2.0  # finite, but no longer of unit length
    assert_load_fails(opt, sd, r"objective 'safety': field 'basis' is not orthonormal")


def test_non_orthonormal_basis_on_one_tensor_slice_is_rejected():
    params = make_params()
    opt = make_opt(params, scope="tensor")
    sd = saved(opt)
    basis = objective_state(sd)["basis"]
    basis[1, 15:20] = basis[0, 15:20]  # parameter 1's columns: rows 0 and 1 now equal
    assert_load_fails(opt, sd, r"field 'basis' is not orthonormal on parameter 1's columns")


@pytest.mark.parametrize("side", ["left", "right"])
def test_non_orthonormal_factored_basis_is_rejected(side):
    opt = make_opt(make_params(), scope="factored")
    sd = saved(opt)
    objective_state(sd)["factors"]["0"][side][0] *= 3.0
    assert_load_fails(opt, sd, rf"field \"factors\['0'\].{side}\" is not orthonormal")


def test_flipped_bytes_in_a_saved_file_do_not_load_silently(tmp_path):
    params = make_params()
    opt = make_opt(params)
    path = tmp_path / "ckpt.pt"
    torch.save(opt.state_dict(), path)
    basis = opt.objectives["safety"].basis
    want = basis.numpy().tobytes()

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        records = [i for i in z.infolist() if "/data/" in i.filename and z.read(i).startswith(want)]
    assert len(records) == 1, "the basis's storage record"
    info = records[0]
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    middle = start + (len(want) // 2) // 4 * 4
    for k in range(8):  # two float32 entries in the middle of the basis's data
        data[middle + k] ^= 0x5A
    path.write_bytes(bytes(data))

    fresh_params = make_params()
    fresh = make_opt(fresh_params, steps=0)
    try:
        sd = torch.load(path, weights_only=True)
    except Exception:  # a loud failure in torch.load is fine too
        return
    assert not torch.equal(objective_state(sd)["basis"], basis), "the flip must reach the basis"
    assert_load_fails(fresh, sd, r"objective 'safety': field 'basis' (has \d+ non-finite|is not orthonormal)")
    set_grads(fresh_params)
    fresh.step()
    assert all(torch.isfinite(p).all() for p in fresh_params)


def test_negative_num_samples_is_rejected():
    opt = make_opt(make_params())
    sd = saved(opt)
    objective_state(sd)["num_samples"] = -2
    assert_load_fails(opt, sd, r"objective 'safety': field 'num_samples' must be >= 0")


# ----------------------------------------------------------------------------- 1. shapes
def test_basis_of_the_wrong_width_names_objective_and_field():
    opt = make_opt(make_params())
    sd = saved(opt)
    obj = objective_state(sd)
    obj["basis"] = obj["basis"][:, :7].contiguous()
    assert_load_fails(opt, sd, r"^objective 'safety': field 'basis' has 7 columns, the covered parameters have 30 entries$")


def test_factored_basis_width_counts_the_flat_parameters_only():
    opt = make_opt(make_params(), scope="factored")
    sd = saved(opt)
    obj = objective_state(sd)
    obj["mean_ref"] = torch.zeros(30)
    assert_load_fails(opt, sd, r"field 'mean_ref' has 30 entries, the covered 1-D parameters have 5 entries")


def test_sample_refs_of_the_wrong_width_are_rejected():
    opt = make_opt(make_params(), mode="conflict", references="samples")
    sd = saved(opt)
    obj = objective_state(sd)
    obj["sample_refs"] = torch.zeros(2, 29)
    assert_load_fails(opt, sd, r"field 'sample_refs' has 29 columns")


@pytest.mark.parametrize("scope, bad", [("global", (5,)), ("tensor", (2, 3))])
def test_energies_of_the_wrong_shape_are_rejected(scope, bad):
    opt = make_opt(make_params(), scope=scope)
    sd = saved(opt)
    objective_state(sd)["energies"] = torch.ones(bad)
    assert_load_fails(opt, sd, r"objective 'safety': field 'energies' has shape")


def test_fisher_of_the_wrong_length_is_rejected():
    opt = make_opt(make_params(), damping=0.5)
    sd = saved(opt)
    objective_state(sd)["fisher"] = torch.ones(12)
    assert_load_fails(opt, sd, r"field 'fisher' has 12 entries, the covered parameters have 30 entries")


def test_factored_matrix_of_the_wrong_shape_is_rejected():
    opt = make_opt(make_params(), scope="factored")
    sd = saved(opt)
    f = objective_state(sd)["factors"]["0"]
    f["right"] = torch.eye(4)[:2]  # the matrix is 5 x 3: right rows have 3 entries
    assert_load_fails(opt, sd, r"field \"factors\['0'\].right\" has shape \(2, 4\), expected \(2, 3\)")


def test_factored_memory_for_a_vector_is_rejected():
    opt = make_opt(make_params(), scope="factored")
    sd = saved(opt)
    factors = objective_state(sd)["factors"]
    factors["1"] = factors["0"]
    assert_load_fails(opt, sd, r"field 'factors' has an entry for position 1, which is not a factored matrix")


def test_coverage_out_of_range_is_rejected():
    opt = make_opt(make_params())
    sd = saved(opt)
    obj = objective_state(sd)
    obj["coverage"] = [0, 1, 9]
    assert_load_fails(opt, sd, r"objective 'safety': field 'coverage' names parameter 9; the optimizer has 3 parameters")


def test_shapes_that_differ_from_the_parameters_are_rejected():
    opt = make_opt(make_params())
    sd = saved(opt)
    other = make_opt(make_params(shapes=[(3, 5), (5,), (2, 5)]), steps=0)
    sd = {**sd, "state": {}, "param_groups": other.base_optimizer.state_dict()["param_groups"]}
    assert_load_fails(other, sd, r"objective 'safety': field 'shapes' has \(5, 3\) for parameter 0; "
                                 r"the optimizer's parameter 0 has shape \(3, 5\)")


# ----------------------------------------------------------------------------- 1. keys, config, version
def test_missing_objectives_key_is_rejected():
    opt = make_opt(make_params())
    sd = saved(opt)
    del sd["gradsafe"]["objectives"]
    assert_load_fails(opt, sd, r"the gradsafe state has no 'objectives' field")


def test_missing_version_is_rejected():
    opt = make_opt(make_params())
    sd = saved(opt)
    del sd["gradsafe"]["version"]
    assert_load_fails(opt, sd, r"the gradsafe state has no 'version' field")


def test_unknown_objective_field_is_rejected():
    opt = make_opt(make_params())
    sd = saved(opt)
    objective_state(sd)["basis_v2"] = torch.zeros(1)
    assert_load_fails(opt, sd, r"objective 'safety': unknown fields \['basis_v2'\]")


def test_missing_objective_field_is_rejected():
    opt = make_opt(make_params())
    sd = saved(opt)
    del objective_state(sd)["energies"]
    assert_load_fails(opt, sd, r"objective 'safety': missing field 'energies'")


def test_invalid_config_is_wrapped():
    opt = make_opt(make_params())
    sd = saved(opt)
    objective_state(sd)["config"]["mode"] = "bogus"
    info = assert_load_fails(opt, sd, r"objective 'safety': field 'config': unknown mode 'bogus'")
    assert isinstance(info.value.__cause__, ValueError)


def test_invalid_defaults_are_wrapped():
    opt = make_opt(make_params())
    sd = saved(opt)
    sd["gradsafe"]["defaults"]["rank"] = 0
    assert_load_fails(opt, sd, r"field 'defaults': rank must be >= 1")


# ----------------------------------------------------------------------------- 2. atomic
def test_bad_version_leaves_the_base_optimizer_state_alone():
    params = make_params()
    opt = make_opt(params)
    sd = saved(opt)
    set_grads(params, seed=99)
    opt.step()  # the wrapper moves on: momentum buffers and counters differ from sd's
    sd["gradsafe"]["version"] = 2
    assert_load_fails(opt, sd, r"unsupported gradsafe state version 2")


def test_one_bad_objective_loads_none():
    params = make_params()
    opt = make_opt(params)
    opt.protect("other", samples(params, seed=5))
    sd = saved(opt)
    fresh = make_opt(make_params(), steps=0)
    objective_state(sd, "other")["energies"][0] = float("nan")
    assert_load_fails(fresh, sd, r"objective 'other': field 'energies'")


def test_load_gradsafe_state_dict_is_atomic():
    opt = make_opt(make_params())
    saved = opt.gradsafe_state_dict()
    saved = {**saved, "objectives": {"safety": {**saved["objectives"]["safety"], "coverage": [0, 5]}}}
    before = fingerprint(opt)
    with pytest.raises(ValueError, match="field 'coverage'"):
        opt.load_gradsafe_state_dict(saved)
    assert_unchanged(opt, before)


def test_base_optimizer_error_restores_its_state_and_keeps_the_objectives():
    params = make_params()
    opt = make_opt(params)
    sd = saved(opt)
    sd["param_groups"] = [{**sd["param_groups"][0], "params": sd["param_groups"][0]["params"][:2]}]
    info = assert_load_fails(opt, sd, r"the saved optimizer state does not match the base optimizer SGD")
    assert isinstance(info.value, StateDictError)
    assert isinstance(info.value.__cause__, ValueError)  # torch's own message, kept


# ----------------------------------------------------------------------------- 3. mismatched base optimizer
def test_adamw_state_into_an_sgd_wrapper_raises_at_load_not_at_step():
    params = make_params()
    adam = make_opt(params, base="adamw")
    sd = saved(adam)
    sgd_params = make_params()
    sgd = make_opt(sgd_params, base="sgd")
    assert_load_fails(sgd, sd, r"the saved optimizer state does not match the base optimizer SGD: .*'momentum'")
    set_grads(sgd_params)
    sgd.step()  # the previous state is back: the step works


def test_sgd_state_into_an_adamw_wrapper_is_rejected():
    sd = saved(make_opt(make_params(), base="sgd"))
    adam = make_opt(make_params(), base="adamw")
    # seen before anything is loaded: SGD's groups lack AdamW's hyperparameters
    assert_load_fails(adam, sd, r"the saved optimizer state does not match the base optimizer AdamW: .*'betas'")


def test_a_base_load_that_raises_is_wrapped_and_changes_nothing():
    sd = saved(make_opt(make_params(), base="adamw"))
    opt = make_opt(make_params(), base="adamw")
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]  # one parameter short
    info = assert_load_fails(opt, sd, r"the saved optimizer state does not match the base optimizer AdamW: ValueError")
    assert isinstance(info.value.__cause__, ValueError)


# ----------------------------------------------------------------------------- 4. settings replaced
def test_loading_other_settings_warns_once_and_still_resumes_exactly():
    sd = saved(make_opt(make_params(), space="update", rank=3))
    opt = make_opt(make_params(), steps=0)
    with pytest.warns(UserWarning) as record:
        opt.load_state_dict(sd)
    ours = [w for w in record if "replace" in str(w.message)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "space 'grad' -> 'update'" in message and "default rank 16 -> 3" in message
    assert "mode" not in message
    assert opt.space == "update" and opt.default_config.rank == 3


def test_loading_the_same_settings_does_not_warn():
    params = make_params()
    opt = make_opt(params, rank=4)
    sd = saved(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(sd)


# ----------------------------------------------------------------------------- version 1 still loads
@pytest.mark.parametrize(
    "options",
    [
        dict(scope="global"),
        dict(scope="tensor", damping=0.5),
        dict(scope="factored"),
        dict(scope="factored", damping=0.5, sides="left"),
        dict(mode="conflict", references="samples"),
    ],
)
def test_valid_states_round_trip_exactly_through_a_file(options, tmp_path):
    params = make_params()
    opt = make_opt(params, **options)
    path = tmp_path / "ckpt.pt"
    torch.save(opt.state_dict(), path)
    fresh_params = make_params()
    for p, q in zip(fresh_params, params):
        p.data.copy_(q)
    fresh = make_opt(fresh_params, steps=0, **options)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert same(fresh.gradsafe_state_dict(), opt.gradsafe_state_dict())
    for ps in (params, fresh_params):
        set_grads(ps, seed=42)
    opt.step()
    fresh.step()
    assert all(torch.equal(p, q) for p, q in zip(params, fresh_params))


def test_version_1_state_without_the_optional_fields_loads():
    opt = make_opt(make_params())
    sd = saved(opt)
    obj = objective_state(sd)
    for key in ("param_bytes", "factors", "fixed_factors"):
        del obj[key]
    fresh = make_opt(make_params(), steps=0)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.objectives["safety"].basis, opt.objectives["safety"].basis)


def test_state_dict_error_is_a_value_error():
    assert issubclass(StateDictError, ValueError) and StateDictError is not ValueError


def test_a_state_saved_to_bytes_loads_with_weights_only():
    opt = make_opt(make_params(), scope="factored", damping=0.5)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_opt(make_params(), steps=0, scope="factored", damping=0.5)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.gradsafe_steps == opt.gradsafe_steps


def test_chunked_orthogonality_check_matches_the_reference():
    from gradsafe.subspace import orthogonality_error

    U = torch.linalg.qr(torch.randn(3000, 5, generator=torch.Generator().manual_seed(0)))[0].T.contiguous()
    U[1] *= 1.01
    assert orthogonality_error(U, chunk=700) == pytest.approx(orthogonality_error(U), abs=1e-12)
    assert orthogonality_error(U[:0], chunk=10) == 0.0
