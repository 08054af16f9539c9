/*
 * claude-stream.js: the browser client of quart-claude's stream route. No build step, no
 * dependency. Served by the blueprint at {prefix}/claude-stream.js.
 *
 *   const stream = ClaudeStream.start("/chat/stream", {message: "Hi"}, {
 *     onEvent(event) { ... },            // start, delta, done, error (protocol v1)
 *     onStatus(status, info) { ... },    // connecting, streaming, reconnecting, finished
 *   });
 *   for await (const event of stream) { ... }   // or iterate instead of onEvent
 *   stream.stop();                               // aborts, and DELETEs: no more tokens paid
 *   ClaudeStream.resume("/chat/stream", streamId, lastEventId, options)  // e.g. after reload
 *
 * It POSTs with fetch (EventSource cannot), parses SSE per the spec across any chunk
 * boundary, resumes a dropped connection with Last-Event-ID (-1 when no event arrived yet),
 * sees each event once, and ends every stream with exactly one `done` or `error` event.
 */
(function (global) {
  "use strict";

  /** Server-Sent Events parsing per the HTML spec, fed arbitrary chunks of text. */
  class SSEParser {
    constructor() {
      this.buffer = "";
      this.data = [];
      this.eventType = "";
      this.lastId = null;
      this.pendingCR = false;
    }

    /** Feed decoded text; returns the complete events it finished. */
    feed(text) {
      const events = [];
      if (!text) return events;
      if (this.pendingCR && text[0] === "\n") text = text.slice(1); // the LF of a split CRLF
      this.pendingCR = false;
      let buffer = this.buffer + text;
      let start = 0;
      for (;;) {
        const cr = buffer.indexOf("\r", start);
        const lf = buffer.indexOf("\n", start);
        if (cr === -1 && lf === -1) break;
        let end, next;
        if (cr === -1 || (lf !== -1 && lf < cr)) {
          end = lf;
          next = lf + 1;
        } else if (cr + 1 < buffer.length) {
          end = cr;
          next = buffer[cr + 1] === "\n" ? cr + 2 : cr + 1;
        } else {
          end = cr; // a CR at the very end: a LF may follow in the next chunk
          next = cr + 1;
          this.pendingCR = true;
        }
        const event = this.line(buffer.slice(start, end));
        if (event) events.push(event);
        start = next;
      }
      this.buffer = buffer.slice(start);
      return events;
    }

    line(line) {
      if (line === "") {
        if (this.data.length === 0) {
          this.eventType = "";
          return null;
        }
        const event = {data: this.data.join("\n"), id: this.lastId, type: this.eventType || "message"};
        this.data = [];
        this.eventType = "";
        return event;
      }
      if (line[0] === ":") return null; // a comment: `: ping`
      const colon = line.indexOf(":");
      const name = colon === -1 ? line : line.slice(0, colon);
      let value = colon === -1 ? "" : line.slice(colon + 1);
      if (value[0] === " ") value = value.slice(1);
      if (name === "data") this.data.push(value);
      else if (name === "event") this.eventType = value;
      else if (name === "id" && value.indexOf("\0") === -1) this.lastId = value;
      return null;
    }
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  /** One answer: a POST, then as many GET resumes as the network needs. */
  class Stream {
    constructor(url, body, options, streamId, lastEventId) {
      this.url = url.replace(/\/+$/, "");
      this.body = body;
      this.options = Object.assign(
        {maxReconnects: 8, reconnectDelay: 500, maxReconnectDelay: 5000, headers: {}},
        options || {},
      );
      this.streamId = streamId || null;
      this.lastEventId = lastEventId === undefined || lastEventId === null ? -1 : lastEventId;
      this.finished = false;
      this.stopped = false;
      this.controller = null;
      this.queue = [];
      this.waiters = [];
      this.done = this.run(); // resolves with the final event
    }

    emit(event) {
      if (event.type === "done" || event.type === "error") this.finished = true;
      if (this.options.onEvent) this.options.onEvent(event);
      const waiter = this.waiters.shift();
      if (waiter) waiter({value: event, done: false});
      else this.queue.push(event);
    }

    status(status, info) {
      if (this.options.onStatus) this.options.onStatus(status, info || {});
    }

    async run() {
      let attempt = 0;
      let final = null;
      while (!this.finished) {
        const progressBefore = this.lastEventId;
        try {
          this.status(attempt === 0 ? "connecting" : "reconnecting", {attempt});
          final = await this.once();
          if (final) break;
        } catch (error) {
          if (this.stopped) break;
          if (error && error.fatal) {
            final = error.event;
            this.emit(final);
            break;
          }
        }
        if (this.finished || this.stopped) break;
        if (this.lastEventId !== progressBefore) attempt = 0; // progress: drops in a row count
        if (!this.streamId || attempt >= this.options.maxReconnects) {
          final = {
            type: "error",
            error: "network_error",
            message: "Lost the connection to the server and could not resume the answer.",
            retryable: true,
            partial: this.lastEventId >= 1,
          };
          this.emit(final);
          break;
        }
        attempt += 1;
        const delay = Math.min(this.options.reconnectDelay * attempt, this.options.maxReconnectDelay);
        this.status("reconnecting", {attempt, delay});
        await sleep(delay);
      }
      if (this.stopped && !this.finished) {
        final = {type: "done", stop_reason: "cancelled", usage: {}};
        this.emit(final);
      }
      this.status("finished", {event: final});
      while (this.waiters.length) this.waiters.shift()({value: undefined, done: true});
      return final;
    }

    /** One HTTP exchange. Returns the final event, or null when the body was cut. */
    async once() {
      this.controller = new AbortController();
      const headers = Object.assign({}, this.options.headers);
      let request;
      if (this.streamId === null) {
        headers["Content-Type"] = "application/json";
        request = {method: "POST", headers, body: JSON.stringify(this.body)};
      } else {
        headers["Last-Event-ID"] = String(this.lastEventId);
        request = {method: "GET", headers};
      }
      request.signal = this.controller.signal;
      request.cache = "no-store";
      const target = this.streamId === null ? this.url : this.url + "/" + encodeURIComponent(this.streamId);
      const response = await fetch(target, request);
      if (response.status === 204) {
        // nothing after our last event, ever: it ended while we were away
        const event = {type: "done", stop_reason: "end_turn", usage: {}};
        this.emit(event);
        return event;
      }
      if (!response.ok) throw await this.refusal(response);
      this.streamId = this.streamId || response.headers.get("X-Stream-Id");
      if (this.options.onStreamId) this.options.onStreamId(this.streamId);
      this.status("streaming", {streamId: this.streamId});
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      const parser = new SSEParser();
      for (;;) {
        const {value, done} = await reader.read();
        if (done) return null; // ended without done/error: a cut; resume
        for (const raw of parser.feed(decoder.decode(value, {stream: true}))) {
          if (raw.id !== null && /^\d+$/.test(raw.id)) {
            const index = Number(raw.id);
            if (index <= this.lastEventId) continue; // seen before the reconnect
            this.lastEventId = index;
          }
          let event;
          try {
            event = JSON.parse(raw.data);
          } catch (_) {
            continue;
          }
          if (event.resume === true) return null; // handed off to another server: resume
          this.emit(event);
          if (this.finished) {
            this.controller.abort();
            return event;
          }
        }
      }
    }

    async refusal(response) {
      let payload = {};
      try {
        payload = await response.json();
      } catch (_) {
        /* not JSON: keep the status */
      }
      const header = response.headers.get("Retry-After");
      const retryAfter = header && /^\d+$/.test(header) ? Number(header) : undefined;
      const retryable = response.status === 429 || response.status >= 500;
      if (retryable && this.streamId !== null && response.status !== 404) {
        return new Error("retry"); // a resume refused for now (a restart, a 503): try again
      }
      const error = new Error(payload.message || response.statusText);
      error.fatal = true;
      error.event = {
        type: "error",
        error: payload.error || "http_" + response.status,
        message: payload.message || "The server answered " + response.status + ".",
        retryable,
        status: response.status,
      };
      if (retryAfter !== undefined) error.event.retry_after = retryAfter;
      return error;
    }

    /** The stop button: abort the connection and tell the server to stop generating. */
    async stop() {
      if (this.finished || this.stopped) return;
      this.stopped = true;
      if (this.controller) this.controller.abort();
      if (this.streamId) {
        const target = this.url + "/" + encodeURIComponent(this.streamId);
        try {
          await fetch(target, {method: "DELETE", headers: this.options.headers});
        } catch (_) {
          /* the server stops it anyway once its resume grace runs out */
        }
      }
    }

    [Symbol.asyncIterator]() {
      return {
        next: () => {
          if (this.queue.length) return Promise.resolve({value: this.queue.shift(), done: false});
          if (this.finished || this.stopped) return Promise.resolve({value: undefined, done: true});
          return new Promise((resolve) => this.waiters.push(resolve));
        },
      };
    }
  }

  global.ClaudeStream = {
    SSEParser,
    start: (url, body, options) => new Stream(url, body, options, null, -1),
    resume: (url, streamId, lastEventId, options) => new Stream(url, null, options, streamId, lastEventId),
  };
})(typeof window !== "undefined" ? window : globalThis);
