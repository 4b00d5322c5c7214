// A tool-use conversation through the official TypeScript SDK's
// client.messages.stream(), for api/typescript_sdk_test.go: the same
// script runs against sluice and against the fake upstream, and the test
// compares what it prints.
//
//   node stream-tools.mjs BASE_URL API_KEY MODEL [USER_ID]
//
// or SDKTEST_BASE_URL, SDKTEST_API_KEY, SDKTEST_MODEL, SDKTEST_USER_ID.
// USER_ID becomes metadata.user_id (sluice requires it; leave it out
// against the upstream). Prints one JSON object to stdout:
//
//   {"sdk_version": "...",
//    "turns": [{"events": ["message_start", "content_block_start:text", ...],
//               "message": <await stream.finalMessage()>}, ...]}
//
// The first turn asks for the tool; the second sends its tool_result back,
// and its answer's message_delta carries stop_details and a container.
// Event kinds are the event type, with the block type (content_block_start)
// or the delta type (content_block_delta) after a colon; consecutive text
// deltas count once, since sluice may join them.
import Anthropic from '@anthropic-ai/sdk';
import { VERSION } from '@anthropic-ai/sdk/version';

const [baseURL, apiKey, model, userID] = [
  process.argv[2] ?? process.env.SDKTEST_BASE_URL,
  process.argv[3] ?? process.env.SDKTEST_API_KEY,
  process.argv[4] ?? process.env.SDKTEST_MODEL,
  process.argv[5] ?? process.env.SDKTEST_USER_ID,
];
if (!baseURL || !apiKey || !model) {
  console.error('usage: node stream-tools.mjs BASE_URL API_KEY MODEL [USER_ID]');
  process.exit(2);
}

const client = new Anthropic({ baseURL, apiKey, authToken: null, maxRetries: 0, timeout: 30_000 });

const tools = [
  {
    name: 'get_weather',
    description: 'The current weather at a place.',
    input_schema: {
      type: 'object',
      properties: {
        location: { type: 'string' },
        country: { type: 'string' },
        unit: { type: 'string', enum: ['celsius', 'fahrenheit'] },
      },
    },
  },
];

async function turn(messages) {
  const params = { model, max_tokens: 300, tools, messages };
  if (userID) params.metadata = { user_id: userID };
  const stream = client.messages.stream(params);
  const events = [];
  for await (const ev of stream) {
    let kind = ev.type;
    if (ev.type === 'content_block_start') kind += ':' + ev.content_block.type;
    if (ev.type === 'content_block_delta') kind += ':' + ev.delta.type;
    if (kind === 'content_block_delta:text_delta' && events.at(-1) === kind) continue;
    events.push(kind);
  }
  return { events, message: await stream.finalMessage() };
}

try {
  const messages = [{ role: 'user', content: 'Weather in Paris? [[reply_tokens=3]] [[tool_use=get_weather]]' }];
  const first = await turn(messages);
  const call = first.message.content.find((b) => b.type === 'tool_use');
  const turns = [first];
  if (call) {
    messages.push(
      { role: 'assistant', content: first.message.content },
      {
        role: 'user',
        content: [{ type: 'tool_result', tool_use_id: call.id, content: 'Sunny, 21 °C [[reply_tokens=5]] [[delta_fields]]' }],
      },
    );
    turns.push(await turn(messages));
  }
  process.stdout.write(JSON.stringify({ sdk_version: VERSION, turns }) + '\n');
} catch (err) {
  console.error(`stream-tools: ${err?.stack ?? err}`);
  process.exit(1);
}
