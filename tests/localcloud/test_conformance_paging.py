"""Paging as the SDKs follow it: an ARM list is `{"value": [...], "nextLink": <absolute URL>}`
(the REST specs' `x-ms-pageable` with `nextLinkName: nextLink`; the URL is opaque to clients, so
its form here, the same path with `$skiptoken`, is ours), and the last page has no nextLink.
The real sync and aio clients follow it with a small page size and must see exactly the items,
in order and field by field, of the same list answered in one page."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest
from arm_harness import Cloud, nic_body, unique
from test_conformance import MODES, Clients, run


@pytest.fixture
def nics(cloud: Cloud):
    names = [unique("confpage") for _ in range(5)]
    for name in names:
        cloud.network.network_interfaces.begin_create_or_update(cloud.rg, name, nic_body(cloud)).result()
    try:
        yield names
    finally:
        for name in names:
            cloud.network.network_interfaces.begin_delete(cloud.rg, name).result()


@pytest.mark.parametrize("mode", MODES)
def test_next_links_give_the_items_of_the_unpaged_list(cloud: Cloud, nics: list[str], mode: str):
    async def listing(c: Clients, page_size: int) -> tuple[list[Any], list[dict]]:
        cloud.admin.settings(page_size=page_size)
        pages: list[Any] = []
        items = await c.items(c.network.network_interfaces.list(cloud.rg, raw_response_hook=pages.append))
        return items, [p.http_response.json() for p in pages if p.http_request.method == "GET"]

    async def scenario(c: Clients) -> tuple[Any, Any]:
        return await listing(c, 2), await listing(c, 1000)

    (paged, pages), (unpaged, [whole]) = run(cloud, mode, scenario)
    assert len(pages) >= 3, f"5+ NICs in pages of 2 came in {len(pages)} page(s)"
    endpoint = urlsplit(cloud.info["arm_endpoint"]).netloc
    for page in pages[:-1]:
        link = urlsplit(page["nextLink"])
        assert link.scheme == "https" and link.netloc == endpoint, page["nextLink"]  # absolute, followed as given
        assert link.path.lower().endswith(f"/resourcegroups/{cloud.rg.lower()}/providers/microsoft.network/networkinterfaces")
    assert "nextLink" not in pages[-1] and "nextLink" not in whole
    assert [doc for page in pages for doc in page["value"]] == whole["value"]  # field by field, in order
    assert [n.id for n in paged] == [n.id for n in unpaged] and set(nics) <= {n.name for n in paged}
