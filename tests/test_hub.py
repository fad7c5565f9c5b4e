"""Bundles are models you pull: pull / list / rm / push, pulled names for --bundle, the no-bundle default.

Offline throughout: local folders (and file:// URLs) go through the same selection, cache layout, huggingface_hub
snapshot resolution and sha256 checks as hub repos; the hub path itself runs against a hub-layout cache written
from a local folder, with HF_HUB_OFFLINE set (huggingface_hub's own offline resolution, no request). Uploads need
the hub: only their file list and card are checked here, and an offline push must fail, never pretend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from facellm_edge.bundle import (
    MANIFEST, SCHEMA_VERSION, ArchSpec, Bundle, ImageSpec, Manifest, PromptSpec, TokenSpec, file_entry, load_bundle,
)
from facellm_edge.cli import main
from facellm_edge.errors import BundleError, InputError, UsageError
from facellm_edge.hub import PullConfig, bundles_dir, cached_bundles, find_cached, hub_dir, pull
from facellm_edge.hub import cache as hub_cache
from facellm_edge.hub.pull import parse_manifest

REPO = Path(__file__).resolve().parents[1]
VERIFICATION = {
    "vision": {"int8": {"max_abs_diff": 1.5e-2, "max_rel_diff": 2.5e-3, "cosine_min": 0.99991}},
    "llm": {"q4_0": {"n_positions": 290, "n_image_positions": 256, "top1_agreement": 0.9655, "max_abs_diff": 1.25,
                     "max_rel_diff": 0.061}},
    "tokenizer": {"n_match": 41, "n_texts": 41},
}


def _fake_bundle(root: Path, vision=("int8", "fp32"), llm=("q4_0", "q8_0"), mmproj=True, verification=None) -> Path:
    """A bundle folder with a valid manifest and random-byte files (enough for everything but running a model)."""
    def put(rel: str, n: int):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(n))
        return file_entry(root, p)

    m = Manifest(
        schema_version=SCHEMA_VERSION, created="2026-01-01T00:00:00+00:00",
        source={"model": "Idiap/FaceLLM-1B", "revision": None, "commit": "c" * 40, "path": "/home/someone/ckpt"},
        arch=ArchSpec(64, 2, 14, 0.5, 64, 2, 4, 2, 100, 4096, True),
        image=ImageSpec(448, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        tokens=TokenSpec("<IMG_CONTEXT>", 7, "<img>", 5, "</img>", 6, 256, (3,)),
        prompt=PromptSpec(first="u {image}\n{question} a", followup="e u {question} a", chat_template="t"),
        vision={v: put(f"vision/{v}.onnx", 3000 + i) for i, v in enumerate(vision)},
        llm={q: put(f"llm/{q}.gguf", 5000 + i) for i, q in enumerate(llm)},
        tools={"facellm-edge": "0.1.0"}, verification=verification or {},
        mmproj=put("vision/mmproj-f16.gguf", 700) if mmproj else None,
    )
    (root / MANIFEST).write_text(m.to_json())
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch, no_network) -> Path:
    """A private user cache, offline hub, no socket at all, cwd in tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "cache" / "facellm-edge"


@pytest.fixture
def published(tmp_path, cache) -> tuple[str, Path]:
    """("alice/face-tiny", its source folder): the hub-layout cache holds the whole repo, as after a download of
    everything; pulls of it go through hf_hub_download / snapshot_download offline."""
    src = _fake_bundle(tmp_path / "published", verification=VERIFICATION)
    data = (src / MANIFEST).read_bytes()
    hub_cache.write_local_repo("alice/face-tiny", data, Bundle(src, parse_manifest(data, str(src))))
    return "alice/face-tiny", src


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}


@pytest.fixture
def snapshot_calls(monkeypatch) -> list[dict]:
    """Every huggingface_hub.snapshot_download call's arguments (the real function runs)."""
    import huggingface_hub

    calls, real = [], huggingface_hub.snapshot_download

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    return calls


# -- pull --------------------------------------------------------------------------------------------------------

def test_pull_local_folder_takes_only_the_chosen_files(tmp_path, cache, snapshot_calls):
    src = _fake_bundle(tmp_path / "my bundle")
    b = pull(PullConfig(source=str(src)))
    # the runtime's preferences: q4_0 before q8_0, int8 before fp32; no mmproj unless asked
    assert (b.name, b.quants, b.vision, b.source) == ("local/my-bundle", ("q4_0",), ("int8",), str(src.resolve()))
    assert _files(b.root) == {MANIFEST, "llm/q4_0.gguf", "vision/int8.onnx"}
    assert load_bundle(b.root).manifest.llm.keys() == {"q4_0"}  # every hash checked
    snap = hub_dir() / "models--local--my-bundle" / "snapshots" / b.revision
    assert _files(snap) == _files(b.root)  # the hub layout holds the same subset, as links into blobs
    assert all((snap / f).is_symlink() for f in _files(snap))
    assert os.stat(b.root / "llm/q4_0.gguf").st_ino == os.stat(snap / "llm/q4_0.gguf").st_ino  # hard link
    assert (hub_dir() / "models--local--my-bundle" / "refs" / "main").read_text() == b.revision
    assert snapshot_calls[-1]["local_files_only"] and snapshot_calls[-1]["revision"] == b.revision
    assert sorted(snapshot_calls[-1]["allow_patterns"]) == sorted([MANIFEST, "llm/q4_0.gguf", "vision/int8.onnx"])

    # another quant of the same revision joins the bundle; the file:// URL names the same folder
    b2 = pull(PullConfig(source=src.resolve().as_uri(), quants=("q8_0",), vision=("mmproj",), alias="tiny"))
    assert (b2.root, b2.quants, b2.vision, b2.alias) == (b.root, ("q4_0", "q8_0"), ("int8", "mmproj"), "tiny")
    assert load_bundle(b2.root).manifest.mmproj is not None
    assert find_cached("tiny") == find_cached("local/my-bundle") == b2


def test_pull_hub_repo_through_huggingface_hub_offline(published, cache, snapshot_calls):
    repo, _ = published
    b = pull(PullConfig(source=repo, quants=("q8_0",), vision=("fp32",)))
    assert (b.name, b.source, b.quants, b.vision) == (repo, "hub", ("q8_0",), ("fp32",))
    assert _files(b.root) == {MANIFEST, "llm/q8_0.gguf", "vision/fp32.onnx"}
    (call,) = snapshot_calls
    assert call["repo_id"] == repo and call["revision"] == b.revision and not call["local_files_only"]
    assert sorted(call["allow_patterns"]) == sorted([MANIFEST, "llm/q8_0.gguf", "vision/fp32.onnx"])
    # the pulled record stays local: the bundle loads as any other, its files checked
    assert json.loads((b.root / MANIFEST).read_text())["pulled"]["repo"] == repo
    assert load_bundle(b.root).manifest.verification == VERIFICATION

    url = pull(PullConfig(source=f"https://huggingface.co/{repo}/tree/{b.revision}", quants=("all",)))
    assert url.root == b.root and url.quants == ("q4_0", "q8_0") and url.vision == ("int8", "fp32")

    with pytest.raises(BundleError, match=r"^no bundle at bob/nothing: neither a local folder nor a downloadable "
                                          r"hub repo \(the hub cannot be reached or HF_HUB_OFFLINE is set"):
        pull(PullConfig(source="bob/nothing"))
    with pytest.raises(BundleError, match=rf"{repo}@v9 is not in the cache"):
        pull(PullConfig(source=repo, revision="v9"))


@pytest.mark.parametrize("config, message", [
    (dict(quants=("q5_k_m",)), r"has no LLM quant 'q5_k_m'; it has: q4_0, q8_0$"),
    (dict(vision=("fp16",)), r"has no vision precision 'fp16'; it has: fp32, int8$"),
    (dict(alias="a/b"), r"^--as 'a/b': an alias is one word"),
    (dict(revision="main"), r"^--revision applies to hub repos only"),
])
def test_pull_refuses_what_the_bundle_does_not_have(tmp_path, cache, config, message):
    src = _fake_bundle(tmp_path / "b", mmproj=False)
    with pytest.raises((BundleError, UsageError), match=message):
        pull(PullConfig(source=str(src), **config))
    with pytest.raises(BundleError, match=r"has no mmproj file"):
        pull(PullConfig(source=str(src), vision=("mmproj",)))
    assert not bundles_dir().exists()


def test_damaged_files_fail_the_pull_and_leave_the_cache(tmp_path, cache):
    src = _fake_bundle(tmp_path / "b")
    gguf = src / "llm" / "q4_0.gguf"
    good = gguf.read_bytes()
    gguf.write_bytes(bytes(len(good)))  # same size, other bytes
    with pytest.raises(BundleError, match=r"does not match its manifest.json: llm/q4_0.gguf: sha256 mismatch "
                                          r"\(removed from the cache; re-export it\)$"):
        pull(PullConfig(source=str(src)))
    assert not (bundles_dir() / "local--b").exists()
    repo = hub_dir() / "models--local--b"
    # a failed first pull of a folder leaves nothing (its good files were copies no bundle kept: list and rm did not
    # see them)
    assert not repo.exists()
    gguf.write_bytes(good)
    assert pull(PullConfig(source=str(src))).quants == ("q4_0",)
    (src / "vision" / "int8.onnx").unlink()  # in the cache already (by content): not needed again
    assert pull(PullConfig(source=str(src), vision=("int8",))).vision == ("int8",)
    (src / "llm" / "q8_0.gguf").unlink()
    with pytest.raises(BundleError, match=r"lacks llm/q8_0.gguf, which its manifest.json lists; re-export"):
        pull(PullConfig(source=str(src), quants=("q8_0",)))


def test_sources(tmp_path, cache):
    from facellm_edge.hub.sources import parse_source

    (tmp_path / "owner").mkdir()
    folder = _fake_bundle(tmp_path / "x")
    assert parse_source("alice/face").repo_id == "alice/face" and not parse_source("alice/face").is_local
    assert parse_source("https://hf.co/alice/face/tree/v1.0").revision == "v1.0"
    assert parse_source(folder.as_uri()).folder == folder and parse_source("x").folder == Path("x")
    for bad, error, message in [
        ("owner/name", InputError, "'owner' is a local folder"), ("./nope", InputError, "no bundle folder at"),
        ("https://huggingface.co/datasets/a/b", UsageError, "only huggingface.co model URLs"),
        ("https://example.com/a/b", UsageError, "only huggingface.co model URLs"),
        ("s3://bucket/b", UsageError, "pull takes a hub repo id"), (str(folder / MANIFEST), InputError, "not a folder"),
    ]:
        with pytest.raises(error, match=message):
            parse_source(bad)


# -- list and rm ---------------------------------------------------------------------------------------------------

def test_list_and_rm(tmp_path, published, cache, capsys):
    repo, _ = published
    mine = _fake_bundle(tmp_path / "mine")
    assert main(["pull", repo, "--as", "face"]) == 0
    assert main(["pull", str(mine), "-q", "q8_0,q4_0", "--vision", "all"]) == 0
    capsys.readouterr()
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "ALIAS", "REVISION", "FILES", "SIZE", "LLM", "VISION", "SOURCE"]
    assert lines[1].split()[:3] == [repo, "face", find_cached(repo).revision[:12]]
    assert lines[2].split()[6:8] == ["q4_0,q8_0", "int8,fp32,mmproj"]  # SIZE is two words
    assert main(["list", "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == [repo, "local/mine"] and rows[1]["files"] == 6

    # rm: nothing removed when one name is not in the cache; a folder of the user's is never removed
    assert main(["rm", "face", str(mine)]) == 3
    assert "never a folder of yours" in capsys.readouterr().err and mine.is_dir() and find_cached("face")
    assert main(["rm", "face", repo]) == 0  # its alias and its id: one bundle, removed once
    assert capsys.readouterr().out.count("removed") == 1
    assert [b.name for b in cached_bundles()] == ["local/mine"]
    assert not (hub_dir() / "models--alice--face-tiny").exists()  # its downloads went too
    assert main(["rm", "local/mine"]) == 0 and cached_bundles() == [] and mine.is_dir()



def test_rm_removes_what_a_failed_pull_left(published, cache, capsys):
    """A pull that fails after downloading (here a file whose bytes do not match the manifest's sha256) leaves the
    repo's downloads in the hub-layout cache and no bundle; `rm OWNER/NAME` removes them (it said "no bundle named",
    and only deleting the cache folder by hand freed the space). A name with neither is still an error."""
    repo, _ = published
    blobs = hub_dir() / "models--alice--face-tiny" / "blobs"
    for blob in blobs.iterdir():  # every file but the manifest
        if not blob.read_bytes().startswith(b"{"):
            blob.write_bytes(b"\0" * blob.stat().st_size)
    assert main(["pull", repo]) != 0 and find_cached(repo) is None and blobs.is_dir()
    capsys.readouterr()
    assert main(["list"]) == 0  # shown, on stderr: stdout keeps its table
    out, err = capsys.readouterr()
    assert out.startswith("no bundles in") and err.startswith(f"unfinished download of {repo} (")
    assert main(["rm", repo, "nobody/nothing"]) == 3 and blobs.is_dir()  # one wrong name: nothing removed
    capsys.readouterr()
    assert main(["rm", repo]) == 0
    assert capsys.readouterr().out.startswith(f"removed the unfinished download of {repo}")
    assert not (hub_dir() / "models--alice--face-tiny").exists()
    assert main(["rm", repo]) == 3  # nothing left of it

def test_two_folders_of_one_name_are_two_cached_bundles(tmp_path, cache, capsys):
    """Two USB sticks that both hold ``bundle/``: the second pull is cached beside the first (it replaced it, and
    the first one's alias with it); pulling a folder again updates its own entry."""
    one = _fake_bundle(tmp_path / "usb1" / "bundle", llm=("q4_0",))
    two = _fake_bundle(tmp_path / "usb2" / "bundle", llm=("q8_0",))
    assert main(["pull", str(one), "--as", "one"]) == 0
    assert main(["pull", str(two), "--as", "two"]) == 0
    assert main(["pull", str(one), "--as", "one"]) == 0  # again: the same entry
    assert [(b.name, b.alias, b.source, b.quants) for b in cached_bundles()] == [
        ("local/bundle", "one", str(one.resolve()), ("q4_0",)),
        ("local/bundle-2", "two", str(two.resolve()), ("q8_0",))]
    assert find_cached("one").name == "local/bundle" and find_cached("two").name == "local/bundle-2"


# -- --bundle NAME and the no-bundle default -------------------------------------------------------------------------

def test_bundle_names_resolve_from_the_cache(tmp_path, published, cache, snapshot_calls):
    from facellm_edge.commands import runtime_options as ro

    repo, _ = published
    # not pulled yet: --bundle pulls the files of --quant / --precision
    root = ro.resolve_bundle(repo, quant="q8_0", vision="int8")
    assert _files(root) == {MANIFEST, "llm/q8_0.gguf", "vision/int8.onnx"} and len(snapshot_calls) == 1
    assert ro.resolve_bundle(repo) == root and ro.resolve_bundle("alice--face-tiny") == root
    assert len(snapshot_calls) == 1  # pulled names resolve without huggingface_hub
    with pytest.raises(BundleError, match=rf"^{repo} was pulled without q4_0 \(it has q8_0\); fetch it with "
                                          rf"`facellm-edge pull {repo} --quant q4_0`$"):
        ro.resolve_bundle(repo, quant="q4_0")
    # a local folder of that name wins over the cache
    local = _fake_bundle(tmp_path / "alice--face-tiny")
    assert ro.resolve_bundle("alice--face-tiny") == Path("alice--face-tiny") and local.is_dir()


def test_no_default_bundle_on_a_runtime_only_install(published, cache, monkeypatch):
    from facellm_edge.commands import runtime_options as ro

    monkeypatch.setitem(sys.modules, "torch", None)  # a runtime-only install: torch cannot be imported
    with pytest.raises(ro.NoDefaultBundle) as exc:
        ro.resolve_bundle(None)
    msg = str(exc.value)
    assert exc.value.exit_code == 7 and "\n" not in msg
    for step in ("pip install 'facellm-edge[export]'", "facellm-edge export Idiap/FaceLLM-1B --quant q4_k_m --out B",
                 "facellm-edge push B USER/REPO", "facellm-edge pull USER/REPO"):
        assert step in msg
    assert not bundles_dir().exists()

    # a published default bundle is pulled on first use, no torch needed
    monkeypatch.setattr(ro, "DEFAULT_BUNDLE_REPO", published[0])
    root = ro.resolve_bundle(None)
    assert root == find_cached(published[0]).root and load_bundle(root).manifest.llm.keys() == {"q4_0"}
    monkeypatch.setattr(ro, "DEFAULT_BUNDLE_REPO", None)
    with pytest.raises(ro.NoDefaultBundle, match=r"; bundles pulled here: alice/face-tiny \(pass one with --bundle\)$"):
        ro.resolve_bundle(None)


# -- push --------------------------------------------------------------------------------------------------------

def test_model_card_and_upload_plan(tmp_path, cache, capsys):
    from facellm_edge.hub.card import read_bench_results, render_card
    from facellm_edge.hub.push import PushConfig, upload_plan
    from facellm_edge.registry import get_spec

    src = _fake_bundle(tmp_path / "b", llm=("q4_0", "q4_k_m"), verification=VERIFICATION)
    (src / "notes.txt").write_text("not part of the bundle")
    results_path = REPO / "benchmarks" / "results" / "facellm-1b-synthetic-2core-epyc-v2" / "results.json"
    results = read_bench_results(results_path)
    plan = upload_plan(PushConfig(bundle=src, repo="alice/face", results=results_path))
    assert plan.paths() == ["README.md", MANIFEST, "vision/int8.onnx", "vision/fp32.onnx", "llm/q4_0.gguf",
                            "llm/q4_k_m.gguf", "vision/mmproj-f16.gguf"]  # never notes.txt
    published = json.loads(plan.files[1][1])  # the manifest as it is, but for this machine's paths
    local = json.loads((src / MANIFEST).read_bytes())
    assert published["source"] == {k: v for k, v in local["source"].items() if k != "path"}
    assert {k: v for k, v in published.items() if k != "source"} == {k: v for k, v in local.items() if k != "source"}
    assert not any(b"/home/someone" in (data if isinstance(data, bytes) else b"") for _, data in plan.files)
    card = plan.card
    assert card == render_card(load_bundle(src).manifest, "alice/face", results)
    assert card.startswith("---\nlicense: other\n") and "base_model:\n- Idiap/FaceLLM-1B\n" in card
    assert f"- licence: {get_spec('Idiap/FaceLLM-1B').licence}" in card
    assert "facellm-edge pull alice/face    # llm q4_0, vision int8" in card
    assert "| GGUF vs transformers logits (290 pos, 256 image) | q4_0 | top-1 96.55%" in card
    assert "| tokenizer parity (llama.cpp vs HF ids) |  | 41/41 texts identical |" in card
    # measured speed: the configurations of this bundle's files only, medians read from the results
    edge = [c for c in results["configs"] if c["kind"] in ("edge", "peer")]
    ours = [c for c in edge if c["quant"] in ("q4_0", "q4_k_m") and c["vision"] in ("int8", "fp32", "mmproj")]
    assert ours and len(ours) < len(edge)
    for c in ours:
        cold = c["stages"]["ttft_cold_ms"]["median"] / 1000
        assert f"| {c['name']} | {cold:.2f} s |" in card
    assert not any(f"| {c['name']} |" in card for c in edge if c not in ours)
    (src / "llm" / "q4_0.gguf").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="llm/q4_0.gguf: size"):
        upload_plan(PushConfig(bundle=src, repo="alice/face"))  # a damaged bundle is never published
    with pytest.raises(InputError, match="is not a results.json written by `facellm-edge bench`"):
        read_bench_results(src / MANIFEST)


def test_a_local_checkpoints_paths_are_not_published(tmp_path, cache):
    """A bundle exported from /home/alice/work/ckpt + a LoRA adapter: the card and the published manifest name the
    folders, never the paths (user names, project folders); the local bundle is left as it is."""
    from facellm_edge.hub.push import PushConfig, upload_plan

    src = _fake_bundle(tmp_path / "b")
    d = json.loads((src / MANIFEST).read_text())
    d["source"] = {"model": "/home/alice/work/FaceLLM-ft", "path": "/home/alice/work/FaceLLM-ft",
                   "adapter": "/home/alice/runs/lora-7/adapter", "revision": None, "commit": None}
    (src / MANIFEST).write_text(json.dumps(d))
    plan = upload_plan(PushConfig(bundle=src, repo="alice/face"))
    assert json.loads(plan.files[1][1])["source"] == {"model": "FaceLLM-ft", "adapter": "adapter", "revision": None,
                                                     "commit": None}
    assert "/home/alice" not in plan.card and "a local checkpoint (FaceLLM-ft)" in plan.card
    assert "/home/alice" in (src / MANIFEST).read_text()


def test_push_of_a_pulled_bundle_and_offline(tmp_path, published, cache, capsys):
    from facellm_edge.hub.push import PushConfig, upload_plan

    b = pull(PullConfig(source=published[0]))
    plan = upload_plan(PushConfig(bundle=b.root, repo="bob/face"))
    published_manifest = json.loads(plan.files[1][1])
    assert "pulled" not in published_manifest and published_manifest["llm"].keys() == {"q4_0"}
    assert main(["push", str(b.root), "bob/face", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# bob/face" in out
    assert out.endswith("  README.md\n  manifest.json\n  vision/int8.onnx\n  llm/q4_0.gguf\n")
    assert main(["push", str(b.root), "bob/face"]) == 4  # publishing needs the hub: no pretend success
    assert capsys.readouterr().err == ("error: cannot push to bob/face: HF_HUB_OFFLINE is set, and publishing needs "
                                       "the hub\n")
    with pytest.raises(UsageError, match="push needs a hub repo id OWNER/NAME"):
        PushConfig(bundle=b.root, repo="face")


# -- a pulled partial bundle runs ------------------------------------------------------------------------------------

@pytest.mark.slow  # tiny_bundle
def test_pulled_partial_bundle_answers_without_torch(tiny_bundle, photos, yunet_model, tmp_path):
    """The device path end to end in a fresh process where torch, transformers and insightface cannot be imported,
    offline: pull one configuration of the tiny bundle from its folder, then `ask --bundle NAME`."""
    code = (
        "import sys\n"
        "for m in ('torch', 'transformers', 'insightface'):\n"
        "    sys.modules[m] = None\n"
        "from facellm_edge.cli import main\n"
        f"assert main(['pull', {str(tiny_bundle)!r}, '--quant', 'q8_0', '--vision', 'int8', '--as', 'tiny']) == 0\n"
        f"rc = main(['ask', {str(photos['astronaut'])!r}, 'Age?', '--bundle', 'tiny', '--json', '--max-tokens', '2',"
        f" '--detector-model', {str(yunet_model)!r}])\n"
        "from facellm_edge import FaceLLM\n"
        "from facellm_edge.hub import find_cached\n"
        "with FaceLLM.load(find_cached('tiny').root) as model:\n"
        "    assert model.encoder.precision == 'int8'\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    answers = json.loads(r.stdout[r.stdout.index("{"):])
    assert len(answers["faces"]) == 1
    view = tmp_path / "cache" / "facellm-edge" / "bundles" / "local--tiny"
    assert _files(view) == {MANIFEST, "llm/q8_0.gguf", "vision/int8.onnx"}
