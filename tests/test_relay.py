"""The relay's pacing (chat/relay.py): the CPU workers' streams together
stay within CHAT_FRAMES_PER_SECOND, each process taking its share."""
from django.test import override_settings

from chat.relay import DeltaRelay


def test_the_flush_interval_stretches_with_the_streams_open_and_the_cpu_worker_processes():
    relays = [DeltaRelay(n) for n in range(1, 201)]  # 200 streams open in this process
    with override_settings(CHAT_DELTA_FLUSH_SECONDS=0.04, CHAT_FRAMES_PER_SECOND=2000, CPU_WORKER_PROCESSES=1):
        assert DeltaRelay.interval() == 200 / 2000  # 10 frames a second each: 2,000 in all
    with override_settings(CHAT_DELTA_FLUSH_SECONDS=0.04, CHAT_FRAMES_PER_SECOND=2000, CPU_WORKER_PROCESSES=2):
        assert DeltaRelay.interval() == 200 / 1000  # the other process may send as many
    del relays[20:]
    with override_settings(CHAT_DELTA_FLUSH_SECONDS=0.04, CHAT_FRAMES_PER_SECOND=2000, CPU_WORKER_PROCESSES=2):
        assert DeltaRelay.interval() == 0.04  # few streams: the usual pace
