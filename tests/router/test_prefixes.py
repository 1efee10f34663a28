"""Hot prefixes on the router: chains filed by their hot run, decayed counts, the tiers
holding them from the global index, and `GET /admin/prefixes` (content, limit, auth)."""

from __future__ import annotations

import asyncio

import httpx2 as httpx
import pytest

from pdserve.ipc import messages as m
from pdserve.kv.block_hash import hash_block_chain
from pdserve.kv.events import BlocksStored
from pdserve.router.app import build_app
from pdserve.router.kv_index import KVIndex, prompt_hashes
from pdserve.router.prefixes import HotPrefixes, describe, held_by
from pdserve.sampling_params import SamplingParams
from tests.router.fakes import ScriptedEngineClient
from tests.router.test_migration import Harness

BLOCK = 4
DOC = list(range(100, 124))  # 6 blocks of a shared document


def prompt(question: int) -> list[int]:
    return DOC + [question] * 8  # + 2 blocks of a question asked once


def record(prefixes: HotPrefixes, tokens: list[int], worker_id: str = "w0") -> None:
    prefixes.record(hash_block_chain(tokens, BLOCK), BLOCK, worker_id)


def test_a_shared_document_is_one_chain_of_its_length():
    prefixes = HotPrefixes()
    record(prefixes, prompt(1))
    assert prefixes.top(10) == []  # seen once: nobody shares it yet
    record(prefixes, prompt(2), "w0")
    record(prefixes, prompt(3), "w1")
    [(chain, hits)] = prefixes.top(10)
    assert list(chain.hashes) == hash_block_chain(DOC, BLOCK)
    assert hits == 3
    assert chain.workers == {"w0": 1, "w1": 1}  # requests filed since it became hot
    assert prefixes.num_requests == 3


def test_top_ranks_by_decayed_count_and_the_table_is_bounded():
    prefixes = HotPrefixes(max_chains=2)
    docs = [[d * 1000 + i for i in range(8)] for d in range(3)]
    for doc, sightings in zip(docs, (5, 3, 2), strict=True):
        for _ in range(sightings):
            record(prefixes, doc)
    # Three chains went in, the table holds two: the coldest (2 sightings) was forgotten.
    assert [hits for _, hits in prefixes.top(10)] == [5, 3]
    assert [hits for _, hits in prefixes.top(1)] == [5]
    prefixes.sketch.halve()
    assert [hits for _, hits in prefixes.top(10)] == [2, 1]


def test_held_counts_leading_blocks_per_worker_and_tier():
    hashes = hash_block_chain(DOC, BLOCK)
    index = KVIndex()
    events = [BlocksStored(hashes, "device"), BlocksStored(hashes[:4], "disk")]
    index.apply(m.KVEvents("w0", 0, events, is_snapshot=True))
    index.apply(m.KVEvents("w1", 0, [BlocksStored(hashes[1:], "device")], is_snapshot=True))
    assert held_by(index, hashes) == {"w0": {"device": 6, "disk": 4}}


def test_describe_has_hashes_and_lengths_never_text():
    prefixes = HotPrefixes()
    for question in (1, 2):
        record(prefixes, prompt(question))
    hashes = hash_block_chain(DOC, BLOCK)
    index = KVIndex()
    index.apply(m.KVEvents("w0", 0, [BlocksStored(hashes, "disk")], is_snapshot=True))
    body = describe(prefixes, index, 5)
    assert body["num_requests"] == 2 and body["num_tracked_chains"] == 1
    [chain] = body["chains"]
    assert chain["hash"] == f"{hashes[-1]:016x}" and chain["head_hash"] == f"{hashes[0]:016x}"
    assert (chain["num_blocks"], chain["num_tokens"], chain["hits"]) == (6, 24, 2)
    assert chain["held"] == {"w0": {"disk": 6}}
    assert chain["requests_by_worker"] == {"w0": 1}
    assert set(chain) == {
        "hash", "head_hash", "num_blocks", "num_tokens", "hits", "last_seen_s_ago",
        "requests_by_worker", "held",
    }  # fmt: skip


# -- the dispatcher feeds it ------------------------------------------------------------------


def test_the_dispatcher_counts_each_placed_request(builtin_model_dir):
    tokens = list(range(1, 50))  # 48 hashed tokens (the last is always computed): 3 blocks
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    async def main():
        async with Harness(builtin_model_dir, "aggregated", [("w0", "mixed")]) as h:
            for i in range(3):
                outputs = h.client.generate(f"r{i}", None, tokens, params)
                task = asyncio.create_task(anext(outputs))
                worker, add = await h.command_on_any(m.AddRequest)
                worker.emit(add.request_id, [7], finish_reason="length")
                await task
                await outputs.aclose()
            body = describe(h.client.dispatcher.prefixes, h.client.kv_index, 10)
        [chain] = body["chains"]
        assert chain["hash"] == f"{prompt_hashes(tokens, 16)[-1]:016x}"
        assert (chain["num_blocks"], chain["hits"]) == (3, 3)
        assert chain["requests_by_worker"] == {"w0": 2}

    asyncio.run(main())


# -- GET /admin/prefixes ----------------------------------------------------------------------


class PrefixClient(ScriptedEngineClient):
    """A scripted client with what the admin route reads from a `ClusterClient`."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self.dispatcher = type("D", (), {"prefixes": HotPrefixes()})()
        self.kv_index = KVIndex()


@pytest.fixture
def app(builtin_model_dir):
    from pdserve.tokenizer import Tokenizer

    client = PrefixClient(Tokenizer.from_pretrained(builtin_model_dir))
    for question in (1, 2, 3):
        record(client.dispatcher.prefixes, prompt(question))
    other = [7] * 12
    for _ in range(2):
        record(client.dispatcher.prefixes, other)
    return build_app(client, api_key="user-key", admin_key="admin-key")


async def get(app, path: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return await http.get(path, headers=headers)


@pytest.mark.anyio
async def test_admin_prefixes_lists_the_hottest_first(app):
    response = await get(app, "/admin/prefixes", "admin-key")
    assert response.status_code == 200
    body = response.json()
    assert [(c["num_blocks"], c["hits"]) for c in body["chains"]] == [(6, 3), (3, 2)]
    response = await get(app, "/admin/prefixes?limit=1", "admin-key")
    assert [c["hits"] for c in response.json()["chains"]] == [3]


@pytest.mark.anyio
@pytest.mark.parametrize("limit", ["0", "x", "1001"])
async def test_admin_prefixes_refuses_a_bad_limit(app, limit):
    response = await get(app, f"/admin/prefixes?limit={limit}", "admin-key")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "limit"


@pytest.mark.anyio
@pytest.mark.parametrize(("key", "status"), [(None, 401), ("user-key", 403), ("wrong", 403)])
async def test_admin_prefixes_needs_the_admin_key(app, key, status):
    response = await get(app, "/admin/prefixes", key)
    assert response.status_code == status
    assert "chains" not in response.text
