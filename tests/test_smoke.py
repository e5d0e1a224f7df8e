"""The shortest path: submit over REST, run a real script, read its output back."""

from conftest import submit, wait_final


async def test_hello_runs_to_success(client):
    """A submitted script runs and its output is archived and downloadable."""
    task = await submit(client, "hello.sh")
    done = await wait_final(client, task["id"])
    assert done["status"] == "success" and done["exit_code"] == 0
    response = await client.get(f"/tasks/{task['id']}/output")
    assert await response.read() == b"hello world\n"
