"""Several models by name, swapped while serving: real servers on the tiny Llama and checkpoints derived from it.

Expected values come from independent in-process forwards (`HFBackend` on each folder) and, for
mixing, from weights mixed here with torch from the definition; the swaps run on real servers,
through real LoadModel calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

from klservice_client import (
    FailedPrecondition, InvalidArgument, KLClient, ModelNotFound, PermissionDenied, RevisionMismatch, Unauthenticated,
)
from tests.server.test_auth import KLSERVICE, add_tenant
from tests.server.test_client_behaviour import GatedBackend
from tests.server.test_client_behaviour import hf_backend  # noqa: F401 - a fixture used below
from tests.server.test_metrics_and_health import scrape
from tests.server.test_sharing import wait_until

RNG = np.random.default_rng(7)
SEQUENCES = [RNG.integers(0, 49152, size=n).tolist() for n in (24, 17, 31)]
PROMPTS = [5, 3, 9]


def _copy_with(source, target, change):
    """A copy of the model folder `source` at `target`, its weights passed through `change(name, tensor)`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    for path in target.glob("*.safetensors"):
        tensors = {name: change(name, tensor) for name, tensor in load_file(path).items()}
        save_file(tensors, str(path), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_dir):
    """Folders: the tiny model, a perturbed copy, one with NaN weights, one with a cut weight file, one with
    another tokenizer (same weights)."""
    import torch
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("checkpoints")
    generator = torch.Generator().manual_seed(1)
    perturbed = _copy_with(tiny_model_dir, root / "perturbed",
                           lambda name, t: t + 0.05 * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t)
    broken = _copy_with(tiny_model_dir, root / "nan-weights",
                        lambda name, t: torch.full_like(t, float("nan")) if "norm" in name else t)
    cut = shutil.copytree(tiny_model_dir, root / "cut-weights")
    weights = next(cut.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    other = shutil.copytree(tiny_model_dir, root / "other-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<a-token-of-its-own>"])
    tokenizer.save_pretrained(other)
    return {"base": tiny_model_dir, "perturbed": perturbed, "nan": broken, "cut": cut, "other": other}


@pytest.fixture(scope="module")
def expected(checkpoints):
    """folder key -> (revision, reference log-probs of SEQUENCES), from in-process forwards."""
    from klservice.backends.hf import HFBackend

    values = {}
    for key in ("base", "perturbed"):
        backend = HFBackend(checkpoints[key], dtype="float32", device="cpu", progress=False)
        scored = backend.score([np.asarray(s) for s in SEQUENCES], PROMPTS).values
        values[key] = (backend.info().revision, np.concatenate(scored))
        backend.close()
    return values


# --------------------------------------------------------------------------- several models


def test_two_models_served_at_once_equal_their_own_forwards(start_server, checkpoints, expected):
    server = start_server(model=(f"ref={checkpoints['base']}", f"teacher={checkpoints['perturbed']}"))
    with KLClient(server.target, job_id="two-models") as client:
        listed = client.list_models()
        assert [(m.name, m.is_default, m.generation) for m in listed] == [("ref", True, 1), ("teacher", False, 1)]
        ref, teacher = client.score(SEQUENCES, PROMPTS), client.score(SEQUENCES, PROMPTS, model="teacher")
        again = client.score(SEQUENCES, PROMPTS, model="ref")  # its own cache partition: ref's values, not teacher's
        assert client.model_info(model="teacher").revision == expected["perturbed"][0] == teacher.revision
        with pytest.raises(ModelNotFound, match="'nope' is not served here; this server serves 'ref', 'teacher'"):
            client.score(SEQUENCES, PROMPTS, model="nope")
        with pytest.raises(ModelNotFound, match="'nope'"):
            client.model_info(model="nope")
    assert (ref.model, ref.revision, teacher.model) == ("ref", expected["base"][0], "teacher")
    np.testing.assert_allclose(ref.ref_logprobs, expected["base"][1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(teacher.ref_logprobs, expected["perturbed"][1], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(again.ref_logprobs, ref.ref_logprobs)
    assert np.abs(ref.ref_logprobs - teacher.ref_logprobs).max() > 1e-2  # the two really differ
    samples = scrape(server.metrics_url)
    scored = sum(n - p for n, p in zip(map(len, SEQUENCES), PROMPTS))
    for model, count in (("ref", 2 * scored), ("teacher", scored)):
        labels = (("model", model), ("tenant", "anonymous"), ("trainer_job", "two-models"))
        assert samples["klservice_tokens_scored_total", labels] == count
    revisions = {dict(labels)["model"]: dict(labels)["revision"]
                 for (name, labels) in samples if name == "klservice_model_info"}
    assert revisions == {"ref": expected["base"][0], "teacher": expected["perturbed"][0]}


def test_one_models_backlog_does_not_hold_up_another(start_server, hf_backend, checkpoints, expected):  # noqa: F811
    """Each model has its own scheduler: with `ref` stuck in a forward and requests queued behind it, `teacher`
    still answers at once."""
    gated = GatedBackend(hf_backend)
    server = start_server(backend=gated, model=(f"ref={checkpoints['base']}", f"teacher={checkpoints['perturbed']}"),
                          cache_mb=0)
    with KLClient(server.target, max_retries=0, timeout=60) as client:
        pool = concurrent.futures.ThreadPoolExecutor(4)
        ref_scheduler = server.server.service.models.get("ref").scheduler
        backlog = [pool.submit(client.score, [SEQUENCES[0]], PROMPTS[0])]
        assert wait_until(lambda: gated.calls == 1)  # ref's worker is held in a forward
        backlog += [pool.submit(client.score, [s], p) for s, p in zip(SEQUENCES[1:], PROMPTS[1:])]
        assert wait_until(lambda: ref_scheduler.queued_requests == 2)
        teacher = client.score(SEQUENCES, PROMPTS, model="teacher")
        assert not any(future.done() for future in backlog)  # ref's work is all still waiting
        np.testing.assert_allclose(teacher.ref_logprobs, expected["perturbed"][1], atol=1e-5, rtol=0)
        gated.gate.set()
        assert [future.result(60).model for future in backlog] == ["ref"] * 3
        pool.shutdown()


def test_a_set_of_models_that_does_not_fit_fails_at_start_naming_them(start_server, checkpoints):
    # The tiny model holds ~6.4M float32 parameters (~25 MiB): one fits 40 MiB, two do not.
    server = start_server(wait=False, memory_budget_mb=40,
                          model=(f"ref={checkpoints['base']}", f"teacher={checkpoints['perturbed']}"))
    with pytest.raises(Exception, match=r"models do not fit cpu at start: ref 2\d MiB, teacher 2\d MiB need \d+ MiB, "
                                        r"but 40 MiB is available \(--memory-budget-mb 40\)"):
        server.wait_ready()


def test_model_specs_parse_names_paths_and_options(tmp_path):
    from klservice.config import ServerConfig

    config = ServerConfig(dtype="float32", device="cpu")
    specs = ServerConfig(**{**config.__dict__, "model": ("ref=/m/a,dtype=bfloat16,max_length=128", "/m/teacher/",
                                                         "e=embedded")}).model_specs()
    assert [(s.name, s.path, s.dtype, s.max_length) for s in specs] == [
        ("ref", "/m/a", "bfloat16", 128), ("teacher", "/m/teacher/", "float32", None), ("e", None, "float32", None)]
    for bad, message in (("a=/m,colour=red", "OPTION=VALUE"), ("bad name=/m", "letters, digits"),
                         ("a=", "no PATH"), ("a=/m,backend=onnx", "backend 'onnx'")):
        with pytest.raises(ValueError, match=message):
            ServerConfig(model=(bad,)).model_specs()
    with pytest.raises(ValueError, match="given twice"):
        ServerConfig(model=("/x/m", "/y/m")).model_specs()


# --------------------------------------------------------------------------- swaps


def test_a_swap_under_load_fails_no_request_and_each_answer_is_its_revisions(start_server, checkpoints, expected):
    """8 threads send Score requests continuously while the model is swapped twice (base → perturbed → base)."""
    server = start_server(allow_admin_from_loopback=True, cache_mb=0)
    name = server.model
    by_revision = {revision: values for revision, values in expected.values()}
    stop, answers, failures = threading.Event(), [], []
    swapped_at: dict[str, float] = {}

    def send(thread: int):
        with KLClient(server.target, job_id=f"load-{thread}", max_retries=0, timeout=60) as client:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    out = client.score(SEQUENCES, PROMPTS)
                except Exception as error:  # noqa: BLE001 - counted: there must be none
                    failures.append(error)
                    continue
                answers.append((sent, out.revision, out.generation, out.ref_logprobs))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    with KLClient(server.target, timeout=120) as admin:
        assert wait_until(lambda: len(answers) >= 16)
        started = time.perf_counter()
        first = admin.load_model(name, str(checkpoints["perturbed"]))
        swap_seconds = time.perf_counter() - started
        swapped_at[first.revision] = time.monotonic()
        assert wait_until(lambda: sum(r == first.revision for _, r, _, _ in answers) >= 16)
        second = admin.load_model(name, str(checkpoints["base"]))
        swapped_at[second.revision + "/2"] = time.monotonic()
        count = len(answers)
        assert wait_until(lambda: len(answers) >= count + 16)
    stop.set()
    for thread in threads:
        thread.join(60)
    print(f"swap (load, check, switch) {swap_seconds:.2f} s; {len(answers)} answers, {len(failures)} failed")
    assert failures == []
    assert (first.generation, second.generation) == (2, 3)
    assert (first.revision, second.revision) == (expected["perturbed"][0], expected["base"][0])
    generations = {1: expected["base"][0], 2: expected["perturbed"][0], 3: expected["base"][0]}
    for sent, revision, generation, values in answers:
        assert generations[generation] == revision
        np.testing.assert_allclose(values, by_revision[revision], atol=1e-5, rtol=0)
        if sent > swapped_at[first.revision] and sent < swapped_at[second.revision + "/2"]:
            assert generation >= 2  # sent after the first switch: never the first revision again
        if sent > swapped_at[second.revision + "/2"]:
            assert generation == 3
    assert {generation for _, _, generation, _ in answers} == {1, 2, 3}
    samples = scrape(server.metrics_url)
    assert samples["klservice_model_loads_total", (("model", name), ("result", "ok"))] == 2
    info = [dict(labels) for (metric, labels) in samples if metric == "klservice_model_info"]
    assert [(i["model"], i["generation"], i["revision"]) for i in info] == [(name, "3", second.revision)]


def test_a_replaced_revision_finishes_its_requests_and_is_released_after_the_last(start_server, hf_backend, checkpoints):  # noqa: F811
    gated = GatedBackend(hf_backend)
    server = start_server(backend=gated, allow_admin_from_loopback=True, cache_mb=0)
    models = server.server.service.models
    old = models.get()
    with KLClient(server.target, max_retries=0, timeout=60) as client:
        pool = concurrent.futures.ThreadPoolExecutor(1)
        held = pool.submit(client.score, SEQUENCES, PROMPTS)
        assert wait_until(lambda: gated.calls == 1)  # inside the old revision's forward
        new = client.load_model(server.model, str(checkpoints["perturbed"]))
        assert old.retired and old.leases == 1 and not old.released.is_set()
        after = client.score(SEQUENCES, PROMPTS)  # the new revision answers while the old one is still busy
        assert after.revision == new.revision != old.info.revision
        gated.gate.set()
        assert held.result(60).revision == old.info.revision  # admitted before the switch: finished on the old one
        assert wait_until(old.released.is_set)
        pool.shutdown()


def test_mixup_alpha_serves_the_mixed_weights(start_server, checkpoints, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from klservice.backends.hf import HFBackend

    alpha = 0.6
    old = AutoModelForCausalLM.from_pretrained(checkpoints["base"], dtype=torch.float32)
    new = AutoModelForCausalLM.from_pretrained(checkpoints["perturbed"], dtype=torch.float32)
    with torch.no_grad():
        for p_old, p_new in zip(old.parameters(), new.parameters()):
            p_old.copy_((1 - alpha) * p_old + alpha * p_new)  # the definition, written out
    old.save_pretrained(tmp_path / "mixed")
    shutil.copy(checkpoints["base"] / "tokenizer.json", tmp_path / "mixed")
    reference = HFBackend(tmp_path / "mixed", dtype="float32", device="cpu", progress=False)
    want = np.concatenate(reference.score([np.asarray(s) for s in SEQUENCES], PROMPTS).values)
    reference.close()

    server = start_server(allow_admin_from_loopback=True, cache_dir=str(tmp_path / "cache"))
    with KLClient(server.target) as client:
        info = client.load_model(server.model, str(checkpoints["perturbed"]), mixup_alpha=alpha)
        got = client.score(SEQUENCES, PROMPTS)
        assert (info.generation, info.mixup_alpha, got.revision) == (2, alpha, info.revision)
        np.testing.assert_allclose(got.ref_logprobs, want, atol=2e-6, rtol=0)
        mixed_dirs = list((tmp_path / "cache" / "mixed").iterdir())
        assert len(mixed_dirs) == 1  # the mixed revision's own folder
        client.load_model(server.model, str(checkpoints["base"]))  # replaced: its folder goes when it is released
        assert wait_until(lambda: not list((tmp_path / "cache" / "mixed").iterdir()))
        with pytest.raises(InvalidArgument, match=r"mixup_alpha: 1.5 is not in \[0, 1\]"):
            client.load_model(server.model, str(checkpoints["base"]), mixup_alpha=1.5)
        with pytest.raises(FailedPrecondition, match="is not served from a checkpoint folder|not served"):
            client.load_model("fresh", str(checkpoints["base"]), mixup_alpha=0.5)
        # the served weights are read again from their folder: a folder changed since is refused
        copy = shutil.copytree(checkpoints["base"], tmp_path / "copy")
        client.load_model("copy", str(copy))
        shutil.copy(checkpoints["perturbed"] / "model.safetensors", copy / "model.safetensors")
        with pytest.raises(FailedPrecondition, match="no longer holds its revision"):
            client.load_model("copy", str(checkpoints["perturbed"]), mixup_alpha=0.5)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"),
    ("nan", "probe forward: the weights give log-probs that are not finite"),
    ("cut", r"model\.safetensors: \d+ bytes, but its header declares \d+; the file is truncated"),
    ("other", "has another tokenizer .* pass force"),
    ("memory", "models do not fit cpu now: .* beside"),
])
def test_a_failed_load_keeps_the_old_revision_serving(start_server, checkpoints, expected, case, message, tmp_path):
    server = start_server(allow_admin_from_loopback=True, memory_budget_mb=40 if case == "memory" else 0)
    path = str(tmp_path / "nowhere") if case == "missing" else str(checkpoints["perturbed" if case == "memory" else case])
    with KLClient(server.target) as client:
        with pytest.raises(FailedPrecondition, match=message):
            client.load_model(server.model, path)
        out = client.score(SEQUENCES, PROMPTS)
        assert (out.revision, out.generation) == (expected["base"][0], 1)
        np.testing.assert_allclose(out.ref_logprobs, expected["base"][1], atol=1e-5, rtol=0)
        if case == "other":  # forced, the other tokenizer is accepted
            assert client.load_model(server.model, path, force=True).generation == 2
    samples = scrape(server.metrics_url)
    assert samples["klservice_model_loads_total", (("model", server.model), ("result", "failed"))] == 1


def test_two_loads_of_one_name_never_run_at_once(start_server, checkpoints):
    from klservice.models import LoadRequest

    server = start_server(allow_admin_from_loopback=True)
    models = server.server.service.models
    request = LoadRequest(name=server.model, path=str(checkpoints["perturbed"]))

    async def both():
        return await asyncio.gather(models.load(request), models.load(request), return_exceptions=True)

    first, second = server.run(both())
    assert first.info.generation == 2
    assert isinstance(second, Exception) and "a load is already running" in str(second)


def test_load_adds_a_name_and_unload_removes_it(start_server, checkpoints, expected):
    server = start_server(allow_admin_from_loopback=True, max_models=2)
    with KLClient(server.target) as client:
        added = client.load_model("teacher", str(checkpoints["perturbed"]))
        assert (added.name, added.generation, added.is_default) == ("teacher", 1, False)
        out = client.score(SEQUENCES, PROMPTS, model="teacher")
        np.testing.assert_allclose(out.ref_logprobs, expected["perturbed"][1], atol=1e-5, rtol=0)
        with pytest.raises(FailedPrecondition, match="--max-models"):
            client.load_model("third", str(checkpoints["base"]))
        with pytest.raises(FailedPrecondition, match="the default model and cannot be unloaded"):
            client.unload_model(server.model)
        assert client.unload_model("teacher") == [server.model]
        with pytest.raises(ModelNotFound):
            client.score(SEQUENCES, PROMPTS, model="teacher")
        with pytest.raises(InvalidArgument, match="use 1-64 letters"):
            client.load_model("no spaces please", str(checkpoints["base"]))


# --------------------------------------------------------------------------- pinning


def test_a_pinned_client_is_refused_after_a_swap_naming_both_revisions(start_server, checkpoints, expected):
    server = start_server(allow_admin_from_loopback=True)
    old, new = expected["base"][0], expected["perturbed"][0]
    with KLClient(server.target, pin_revision=True) as client, KLClient(server.target) as admin:
        assert client.score(SEQUENCES, PROMPTS).revision == old
        assert client.pinned_revision() == old
        admin.load_model(server.model, str(checkpoints["perturbed"]))
        with pytest.raises(RevisionMismatch, match=f"expects revision {old[:12]} but model .* is at revision {new[:12]} \\(generation 2\\)"):
            client.score(SEQUENCES, PROMPTS)
        logprobs = np.full(sum(len(s) - p for s, p in zip(SEQUENCES, PROMPTS)), -3.0)
        with pytest.raises(RevisionMismatch):
            client.compute_kl(SEQUENCES, PROMPTS, logprobs=logprobs)
        client.pin(new)
        assert client.compute_kl(SEQUENCES, PROMPTS, logprobs=logprobs).revision == new
        assert admin.score(SEQUENCES, PROMPTS, revision=new[:12]).revision == new  # a prefix of 12 will do
        with pytest.raises(RevisionMismatch):
            admin.score(SEQUENCES, PROMPTS, revision=old)


class SwapBetweenParts(KLClient):
    """A client that swaps the model right after the first part of a split batch is answered."""

    def __init__(self, *args, swap, **kwargs):
        super().__init__(*args, **kwargs)
        self._swap, self.sent, self.answered = swap, [], []

    def _call(self, rpc, request, stub=None, **kwargs):
        if rpc == "Score":
            self.sent.append(request.revision)
        response = super()._call(rpc, request, stub, **kwargs)
        if rpc == "Score":
            self.answered.append(response.model.revision)
            if len(self.answered) == 1:
                self._swap()
        return response


def test_a_split_batch_is_pinned_across_its_parts(start_server, checkpoints, expected):
    server = start_server(allow_admin_from_loopback=True, max_request_tokens=40)
    old, new = expected["base"][0], expected["perturbed"][0]
    with KLClient(server.target) as admin:
        swap = lambda: admin.load_model(server.model, str(checkpoints["perturbed"]))  # noqa: E731
        with SwapBetweenParts(server.target, swap=swap) as client:
            out = client.score(SEQUENCES, PROMPTS)  # 3 parts; the swap falls after the first
        # part 2 was pinned to part 1's revision and refused, so the whole batch went again on the new revision
        assert client.sent == ["", old, "", new, new]
        assert client.answered == [old, new, new, new]
        assert out.revision == new
        np.testing.assert_allclose(out.ref_logprobs, expected["perturbed"][1], atol=1e-5, rtol=0)
        swap = lambda: admin.load_model(server.model, str(checkpoints["base"]))  # noqa: E731
        with SwapBetweenParts(server.target, swap=swap) as client:
            client.pin(new)
            with pytest.raises(RevisionMismatch):  # pinned by the caller: refused, not resent
                client.score(SEQUENCES, PROMPTS)


# --------------------------------------------------------------------------- who may


def test_operator_rpcs_need_the_admin_role(start_server, checkpoints, tmp_path):
    path = tmp_path / "auth.toml"
    trainer, ops = add_tenant(path, "team-a"), add_tenant(path, "ops", "--role", "admin")
    server = start_server(auth_file=str(path), allow_admin_from_loopback=True)  # the flag means nothing with auth
    folder = str(checkpoints["perturbed"])
    with KLClient(server.target, token=trainer, max_retries=0) as client:
        with pytest.raises(PermissionDenied, match="LoadModel: tenant 'team-a' has the role 'trainer'"):
            client.load_model(server.model, folder)
        with pytest.raises(PermissionDenied, match="UnloadModel"):
            client.unload_model(server.model)
        assert [m.name for m in client.list_models()] == [server.model]  # listing is for everyone
    with KLClient(server.target, max_retries=0) as client:  # no token
        with pytest.raises(Unauthenticated):
            client.load_model(server.model, folder)
    with KLClient(server.target, token=ops) as client:
        assert client.load_model(server.model, folder).generation == 2
    plain = start_server()
    with KLClient(plain.target, max_retries=0) as client:
        with pytest.raises(PermissionDenied, match="no --auth-file .* --allow-admin-from-loopback"):
            client.load_model(plain.model, folder)


def test_on_loopback_means_loopback():
    from klservice.service import _on_loopback

    assert _on_loopback("ipv4:127.0.0.1:5000") and _on_loopback("ipv6:%5B::1%5D:5000")  # as grpc writes peers
    assert _on_loopback("ipv6:[::1]:5000") and _on_loopback("ipv6:%5B::ffff:127.0.0.1%5D:5000")
    assert not _on_loopback("ipv4:10.0.0.7:5000") and not _on_loopback("ipv6:%5B2001:db8::1%5D:5000")
    assert not _on_loopback(None) and not _on_loopback("ipv4:1127.0.0.1:5000")


def test_operator_rpcs_from_ipv6_loopback(start_server, checkpoints):
    server = start_server(host="::1", allow_admin_from_loopback=True)
    with KLClient(f"[::1]:{server.server.port}") as client:
        assert client.load_model(server.model, str(checkpoints["perturbed"])).generation == 2


# --------------------------------------------------------------------------- the command line


def test_klservice_admin_loads_lists_and_unloads(start_server, checkpoints):
    server = start_server(allow_admin_from_loopback=True)

    def run(*args):
        result = subprocess.run([KLSERVICE, *args, "--target", server.target], capture_output=True, text=True,
                                timeout=120)
        return result.returncode, result.stdout + result.stderr

    code, text = run("admin", "load", "teacher", str(checkpoints["perturbed"]))
    assert code == 0 and "teacher  revision" in text and "generation 1" in text, text
    code, text = run("admin", "list")
    assert code == 0 and text.splitlines()[0].endswith("(default)") and "teacher" in text.splitlines()[1], text
    code, text = run("info")
    assert code == 0 and text.count("revision") == 2 and "teacher" in text, text
    code, text = run("admin", "load", "teacher", "/nowhere")
    assert code == 1 and "no such folder" in text, text
    code, text = run("admin", "unload", "teacher")
    assert code == 0 and "unloaded 'teacher'" in text, text
    code, text = run("info", "--model", "teacher")
    assert code == 1 and "NOT_FOUND" in text, text


# --------------------------------------------------------------------------- bad input to the admin surface


def test_every_bad_input_to_load_and_unload_is_invalid_argument_naming_the_field(start_server, checkpoints):
    """Names that are empty, not names (".", "..", hidden), an empty path, an unknown dtype or backend: the caller's
    mistakes, INVALID_ARGUMENT naming the field; the server serves on."""
    server = start_server(allow_admin_from_loopback=True, max_models=3)
    base = str(checkpoints["base"])
    with KLClient(server.target, max_retries=0) as client:
        for name, message in [("", "name: empty"), (".", r"name: '\.': use 1-64"), ("..", r"name: '\.\.': use 1-64"),
                              (".hidden", r"name: '\.hidden': use 1-64"), ("-x", r"name: '-x': use 1-64")]:
            with pytest.raises(InvalidArgument, match=message):
                client.load_model(name, base)
            with pytest.raises(InvalidArgument, match=message):
                client.unload_model(name)
        with pytest.raises(InvalidArgument, match="path: empty"):
            client.load_model("teacher", "")
        with pytest.raises(InvalidArgument, match="dtype 'float64' is not one of"):
            client.load_model("teacher", base, dtype="float64")
        with pytest.raises(InvalidArgument, match="backend 'onnx' is not one of"):
            client.load_model("teacher", base, backend="onnx")
        with pytest.raises(ModelNotFound):
            client.unload_model("never-loaded")
        assert client.load_model("teacher", base).name == "teacher"  # none of it held the name
        assert client.score(SEQUENCES, PROMPTS).revision


def test_a_flag_another_overrides_is_named_at_start(start_server, tmp_path, caplog):
    """--allow-admin-from-loopback does nothing beside --auth-file (the auth file decides who is an admin): the start
    log says so, as for the other flags that another makes moot."""
    auth = tmp_path / "auth.toml"
    add_tenant(auth, "ops", "--role", "admin")
    with caplog.at_level("WARNING", logger="klservice.server"):
        start_server(auth_file=str(auth), allow_admin_from_loopback=True, max_connection_age_grace_seconds=9.0)
    assert "--allow-admin-from-loopback is ignored: with --auth-file" in caplog.text
    assert "--max-connection-age-grace-seconds is ignored: --max-connection-age-seconds is 0" in caplog.text


def test_a_starting_server_removes_only_this_hosts_mixing_folders_of_processes_gone(tmp_path):
    """Mixing folders are named after their process (host, pid, start time): a folder of a process of this host that
    is no longer running goes; one of a running process (this one), of another host (a shared cache directory) or
    not named so stays."""
    import socket

    from klservice.models import _remove_stale_mixed, process_tag

    host = socket.gethostname()
    folders = {
        "gone": f"{host}.999999.123+ref-abc",  # no such pid
        "reused": f"{host}.{os.getpid()}.1+ref-abc",  # this pid, but not this process's start time
        "alive": f"{process_tag()}+ref-abc",
        "elsewhere": "another-host.999999.123+ref-abc",
        "other": "notes",
    }
    for name in folders.values():
        (tmp_path / name / "model").mkdir(parents=True)
    _remove_stale_mixed(tmp_path)
    left = {path.name for path in tmp_path.iterdir()}
    assert left == {folders["alive"], folders["elsewhere"], folders["other"]}
