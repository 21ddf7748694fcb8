"""server/output_relay.py: outputs put from another thread reach their queues in order, with
fewer wake-ups of the loop than outputs."""

import asyncio
import threading

from server.output_relay import OutputRelay


def test_every_item_arrives_in_order_with_fewer_wakeups():
    async def main() -> tuple[list[list[int]], int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        schedule = loop.call_soon_threadsafe

        def counting(*args):
            nonlocal wakeups
            wakeups += 1
            return schedule(*args)

        loop.call_soon_threadsafe = counting  # the relay's only way to wake the loop
        relay = OutputRelay(loop)
        queues = [asyncio.Queue() for _ in range(3)]
        steps, per_step = 200, len(queues)

        def scheduler() -> None:  # one output per queue per step, as a decode step delivers them
            for step in range(steps):
                for queue in queues:
                    relay.put(queue, step)

        thread = threading.Thread(target=scheduler)
        thread.start()
        received = [[await queue.get() for _ in range(steps)] for queue in queues]
        thread.join()
        assert steps * per_step > wakeups
        return received, wakeups

    received, wakeups = asyncio.run(main())
    assert received == [list(range(200))] * 3
    assert wakeups >= 1


def test_a_closed_loop_drops_outputs_quietly():
    loop = asyncio.new_event_loop()
    relay = OutputRelay(loop)
    loop.close()
    relay.put(asyncio.Queue(), "late")  # the server is gone: no error on the scheduler thread
    relay.put(asyncio.Queue(), "later")
