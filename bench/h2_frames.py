"""What HTTP/2 to the upstream would add per relayed event, on the maintained ``h2`` library
(Hypercorn's own dependency): a client connection receiving one SSE event per DATA frame,
over 100 streams, and giving the flow-control window back.

    python -m bench.h2_frames

HTTP/2 would carry many streams on one TLS connection (one socket and one TLS session for
up to the server's ``SETTINGS_MAX_CONCURRENT_STREAMS``, where HTTP/1.1 holds one of each per
stream). This is its price in CPU: the frame parsing and the state machine, in Python, that
aiohttp's HTTP/1.1 parser does in C.
"""

from __future__ import annotations

import time

import h2.config
import h2.connection
import h2.events
import h2.settings

EVENT = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":" token 1765100000.123456"}}\n\n'
)
STREAMS = 100
EVENTS = 20_000


def main() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24})
    client.increment_flow_control_window(1 << 30)
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    streams = []
    for _ in range(STREAMS):
        stream_id = client.get_next_available_stream_id()
        headers = [(b":method", b"POST"), (b":path", b"/v1/messages"), (b":scheme", b"https")]
        client.send_headers(stream_id, [*headers, (b":authority", b"api")], end_stream=True)
        streams.append(stream_id)
    server.receive_data(client.data_to_send())
    for stream_id in streams:
        server.send_headers(stream_id, [(b":status", b"200")])
    client.receive_data(server.data_to_send())
    frames = []
    for index in range(EVENTS):
        server.send_data(streams[index % STREAMS], EVENT)
        frames.append(server.data_to_send())
    started = time.process_time()
    received = 0
    for frame in frames:  # one read per event, as a paced relay gets them
        for event in client.receive_data(frame):
            if isinstance(event, h2.events.DataReceived):
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                received += 1
        client.data_to_send()
    per_event = (time.process_time() - started) / received * 1e6
    print(f"h2, client side: {per_event:.1f} µs of CPU per event ({received} events)")


if __name__ == "__main__":
    main()
