// Drives quart-claude's AI SDK routes with the `ai` package's own DefaultChatTransport and
// readUIMessageStream (what useChat runs in a browser). Prints one JSON line of results.
//   node check.mjs <base url of the blueprint> reply|error|tools|refused|resume|conversation
import { DefaultChatTransport, readUIMessageStream } from "ai";

const [base, scenario] = process.argv.slice(2);
const transport = new DefaultChatTransport({ api: `${base}/ai-sdk/chat` });
const messages = [{ id: "u1", role: "user", parts: [{ type: "text", text: "hi" }] }];
const textOf = (message) =>
  (message?.parts ?? []).filter((p) => p.type === "text").map((p) => p.text).join("");

async function read(stream) {
  const errors = [];
  let last;
  try {
    for await (const message of readUIMessageStream({ stream, onError: (e) => errors.push(e.message) })) {
      last = message;
    }
  } catch (e) {
    errors.push(e.message);
  }
  return { last, errors };
}

const send = (chatId, abortSignal) =>
  transport.sendMessages({ chatId, messages, trigger: "submit-message", messageId: undefined, abortSignal });

let result;
if (scenario === "reply" || scenario === "error") {
  const { last, errors } = await read(await send(`chat-${scenario}`));
  result = { text: textOf(last), metadata: last?.metadata ?? null, errors };
} else if (scenario === "tools") {
  const { last, errors } = await read(await send("chat-tools"));
  const parts = (last?.parts ?? [])
    .filter((p) => p.type === "text" || p.type === "dynamic-tool")
    .map((p) =>
      p.type === "text"
        ? { type: "text", text: p.text }
        : { type: p.type, toolName: p.toolName, state: p.state, input: p.input, output: p.output ?? null, errorText: p.errorText ?? null },
    );
  result = { parts, errors };
} else if (scenario === "refused") {
  try {
    await send("chat-refused");
    result = { thrown: null };
  } catch (e) {
    result = { thrown: e.message };
  }
} else if (scenario === "resume") {
  const controller = new AbortController();
  const reader = (await send("chat-resume", controller.signal)).getReader();
  let chunks = 0;
  while (chunks < 6) {
    const { done } = await reader.read();
    if (done) break;
    chunks += 1;
  }
  controller.abort(); // the page went away mid-reply
  const resumed = await transport.reconnectToStream({ chatId: "chat-resume" });
  const { last, errors } = await read(resumed);
  const afterFinish = await transport.reconnectToStream({ chatId: "chat-resume" });
  const nothing = await transport.reconnectToStream({ chatId: "never-started" });
  result = { readBeforeAbort: chunks, text: textOf(last), errors, afterFinish, nothing };
}
if (scenario === "conversation") {
  // the server keeps the history: send only the new message, as the AI SDK's docs show
  const lastOnly = new DefaultChatTransport({
    api: `${base}/ai-sdk/chat`,
    prepareSendMessagesRequest: ({ id, messages }) => ({ body: { id, message: messages.at(-1) } }),
  });
  const turn = async (history) =>
    read(await lastOnly.sendMessages({ chatId: "chat-kept", messages: history, trigger: "submit-message", messageId: undefined }));
  const first = await turn(messages);
  const history = [
    ...messages,
    { id: "a1", role: "assistant", parts: [{ type: "text", text: textOf(first.last) }] },
    { id: "u2", role: "user", parts: [{ type: "text", text: "and then?" }] },
  ];
  const second = await turn(history);
  result = { first: textOf(first.last), second: textOf(second.last), errors: [...first.errors, ...second.errors] };
}
console.log(JSON.stringify(result));
