from cachecoord_client import AsyncClient, Layer


async def test_get_user_one(client: AsyncClient) -> None:
    got = await client.get("users", "1")
    assert got.found
    assert b"Ada Lovelace" in got.value
    assert got.layer in (Layer.DATABASE, Layer.REDIS)
