package fakeanthropic_test

import (
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/google/go-cmp/cmp"

	"github.com/sluice-dev/sluice/fakeanthropic"
)

// weatherTool is a client tool with a schema the fake fills in.
var weatherTool = anthropic.ToolParam{
	Name:        "get_weather",
	Description: anthropic.String("The weather at a place."),
	InputSchema: anthropic.ToolInputSchemaParam{
		Properties: map[string]any{
			"location": map[string]any{"type": "string"},
			"unit":     map[string]any{"type": "string", "enum": []string{"celsius", "fahrenheit"}},
			"days":     map[string]any{"type": "integer"},
		},
	},
}

func withTools(p anthropic.MessageNewParams, tools ...anthropic.ToolParam) anthropic.MessageNewParams {
	for _, t := range tools {
		p.Tools = append(p.Tools, anthropic.ToolUnionParam{OfTool: &t})
	}
	return p
}

func withThinking(p anthropic.MessageNewParams, budget int64) anthropic.MessageNewParams {
	p.Thinking = anthropic.ThinkingConfigParamOfEnabled(budget)
	return p
}

// blockSummary is what a content block says, without its random tool id.
type blockSummary struct {
	Type, Text, Thinking, Signature, Name, Data string
	Input                                       string
	Citations                                   string
}

func summarize(t *testing.T, m anthropic.Message) []blockSummary {
	t.Helper()
	out := make([]blockSummary, 0, len(m.Content))
	for _, b := range m.Content {
		s := blockSummary{Type: b.Type, Text: b.Text, Thinking: b.Thinking, Signature: b.Signature, Name: b.Name, Data: b.Data}
		if len(b.Input) > 0 {
			var v any
			if err := json.Unmarshal(b.Input, &v); err != nil {
				t.Fatalf("tool input %q: %v", b.Input, err)
			}
			c, _ := json.Marshal(v)
			s.Input = string(c)
		}
		if len(b.Citations) > 0 {
			var cs []string
			for _, c := range b.Citations {
				cs = append(cs, c.Type+":"+c.CitedText)
			}
			s.Citations = strings.Join(cs, "|")
		}
		out = append(out, s)
	}
	return out
}

// streamAndWhole asks for params both ways and checks that the streamed
// message accumulates to the non-streamed one (tool ids aside); it returns
// the non-streamed message and the streamed events' types.
func streamAndWhole(t *testing.T, client anthropic.Client, params anthropic.MessageNewParams) (*anthropic.Message, []string) {
	t.Helper()
	whole, err := client.Messages.New(ctxWithTimeout(t), params)
	if err != nil {
		t.Fatalf("Messages.New: %v", err)
	}
	acc, kinds := streamed(t, client, params)
	if diff := cmp.Diff(summarize(t, *whole), summarize(t, acc)); diff != "" {
		t.Errorf("streamed content differs from Messages.New (-whole +streamed):\n%s", diff)
	}
	if whole.StopReason != acc.StopReason || whole.Usage.OutputTokens != acc.Usage.OutputTokens {
		t.Errorf("stop %q/%q, output %d/%d: want the same", whole.StopReason, acc.StopReason, whole.Usage.OutputTokens, acc.Usage.OutputTokens)
	}
	return whole, kinds
}

// streamed streams params through the SDK and returns the message it
// accumulates, and the events' kinds in order (type, and the block's or
// delta's type: "content_block_delta:input_json_delta").
func streamed(t *testing.T, client anthropic.Client, params anthropic.MessageNewParams) (anthropic.Message, []string) {
	t.Helper()
	stream := client.Messages.NewStreaming(ctxWithTimeout(t), params)
	defer stream.Close()
	var acc anthropic.Message
	var kinds []string
	for stream.Next() {
		ev := stream.Current()
		kind := ev.Type
		switch ev.Type {
		case "content_block_start":
			kind += ":" + ev.ContentBlock.Type
		case "content_block_delta":
			kind += ":" + ev.Delta.Type
		}
		kinds = append(kinds, kind)
		if err := acc.Accumulate(ev); err != nil {
			t.Fatalf("Accumulate: %v", err)
		}
	}
	if err := stream.Err(); err != nil {
		t.Fatalf("stream: %v", err)
	}
	return acc, kinds
}

func count(kinds []string, kind string) int {
	n := 0
	for _, k := range kinds {
		if k == kind {
			n++
		}
	}
	return n
}

func TestToolUse(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{})
	client := newClient(srv)
	params := withTools(userParams("What is the weather in Paris? [[tool_use=get_weather]]", 200), weatherTool)
	whole, kinds := streamAndWhole(t, client, params)
	if len(whole.Content) != 1 || whole.StopReason != anthropic.StopReasonToolUse {
		t.Fatalf("content %+v, stop %q: want one tool_use block, stop tool_use", whole.Content, whole.StopReason)
	}
	tu := whole.Content[0]
	var input map[string]any
	if err := json.Unmarshal(tu.Input, &input); err != nil {
		t.Fatal(err)
	}
	if tu.Type != "tool_use" || tu.Name != "get_weather" || !strings.HasPrefix(tu.ID, "toolu_") ||
		input["unit"] != "celsius" || input["days"] != 3.0 || input["location"] == "" {
		t.Errorf("tool_use %+v input %v", tu, input)
	}
	// One output token per input_json_delta piece (8 bytes), after an empty
	// first delta.
	pieces := (len(`{"days":3,"location":"","unit":"celsius"}`) + len(input["location"].(string)) + 7) / 8
	if got := count(kinds, "content_block_delta:input_json_delta"); got != pieces+1 || whole.Usage.OutputTokens != int64(pieces) {
		t.Errorf("%d input_json_delta, %d output tokens: want %d and %d", got, whole.Usage.OutputTokens, pieces+1, pieces)
	}

	// With [[reply_tokens=N]] the call follows a text block; tool_choice
	// forces a call without a directive.
	params = withTools(userParams("Let me look [[reply_tokens=3]] [[tool_use]]", 200), weatherTool)
	whole, _ = streamAndWhole(t, client, params)
	if len(whole.Content) != 2 || whole.Content[0].Type != "text" || whole.Content[1].Type != "tool_use" {
		t.Errorf("content %+v: want text then tool_use", whole.Content)
	}
	params = withTools(userParams("no directive", 200), weatherTool)
	params.ToolChoice = anthropic.ToolChoiceParamOfTool("get_weather")
	if whole, _ = streamAndWhole(t, client, params); whole.StopReason != anthropic.StopReasonToolUse {
		t.Errorf("tool_choice tool: stop %q", whole.StopReason)
	}
	// Without the tool in the request the directive is ignored.
	if whole, _ = streamAndWhole(t, client, userParams("hi [[tool_use=get_weather]] [[reply_tokens=2]]", 50)); whole.StopReason != anthropic.StopReasonEndTurn {
		t.Errorf("no tools: stop %q, want end_turn", whole.StopReason)
	}
	// A call that does not fit in max_tokens is left out.
	params = withTools(userParams("x [[tool_use=get_weather]] [[reply_tokens=2]]", 3), weatherTool)
	if whole, _ = streamAndWhole(t, client, params); whole.StopReason != anthropic.StopReasonMaxTokens || len(whole.Content) != 1 {
		t.Errorf("capped: stop %q content %+v, want max_tokens and the text only", whole.StopReason, whole.Content)
	}
}

func TestThinking(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{})
	client := newClient(srv)
	params := withThinking(userParams("Think first [[thinking_tokens=5]] [[reply_tokens=3]] [[redacted_thinking]]", 4000), 2000)
	whole, kinds := streamAndWhole(t, client, params)
	want := []string{"message_start", "content_block_start:thinking",
		"content_block_delta:thinking_delta", "content_block_delta:thinking_delta", "content_block_delta:thinking_delta",
		"content_block_delta:thinking_delta", "content_block_delta:thinking_delta", "content_block_delta:signature_delta",
		"content_block_stop", "content_block_start:redacted_thinking", "content_block_stop",
		"content_block_start:text", "content_block_delta:text_delta", "content_block_delta:text_delta",
		"content_block_delta:text_delta", "content_block_stop", "message_delta", "message_stop"}
	if diff := cmp.Diff(want, kinds); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}
	if len(whole.Content) != 3 || len(strings.Fields(whole.Content[0].Thinking)) != 5 || whole.Content[0].Signature == "" ||
		whole.Content[1].Data == "" || whole.Usage.OutputTokens != 8 {
		t.Errorf("message %+v: want 5 thinking words signed, redacted thinking, 3 words, 8 output tokens", whole)
	}

	// The blocks go back in the next turn unchanged; a changed thinking
	// block is refused, as the API refuses it.
	next := anthropic.MessageNewParams{Model: testModel, MaxTokens: 4000, Thinking: params.Thinking,
		Messages: append(params.Messages, whole.ToParam(), anthropic.NewUserMessage(anthropic.NewTextBlock("and then? [[reply_tokens=2]]")))}
	if _, err := client.Messages.New(ctxWithTimeout(t), next); err != nil {
		t.Fatalf("thinking sent back: %v", err)
	}
	body := `{"model":"` + testModel + `","max_tokens":10,"messages":[{"role":"user","content":"a"},` +
		`{"role":"assistant","content":[{"type":"thinking","thinking":"changed","signature":"` + whole.Content[0].Signature + `"}]},` +
		`{"role":"user","content":"b"}]}`
	res, b := post(t, srv, "/v1/messages", body, nil)
	if e := decodeError(t, res, b); res.StatusCode != http.StatusBadRequest || !strings.Contains(e.Error.Message, "Invalid `signature`") {
		t.Errorf("changed thinking: %d %s", res.StatusCode, b)
	}
}

func TestToolResultCompletesTheTurn(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{})
	client := newClient(srv)
	params := withTools(userParams("Weather? [[tool_use=get_weather]]", 200), weatherTool)
	first, err := client.Messages.New(ctxWithTimeout(t), params)
	if err != nil {
		t.Fatal(err)
	}
	id := first.Content[0].ID
	params.Messages = append(params.Messages, first.ToParam(),
		anthropic.NewUserMessage(anthropic.NewToolResultBlock(id, "Sunny, 21 degrees [[reply_tokens=4]]", false)))
	second, err := client.Messages.New(ctxWithTimeout(t), params)
	if err != nil {
		t.Fatalf("tool result: %v", err)
	}
	if second.StopReason != anthropic.StopReasonEndTurn || len(second.Content) != 1 || len(strings.Fields(second.Content[0].Text)) != 4 {
		t.Errorf("answer to the tool result %+v: want 4 words, end_turn (the directive in the result counts)", second)
	}

	// What the API refuses.
	toolUse := `{"role":"assistant","content":[{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{}}]}`
	tools := `"tools":[{"name":"get_weather","input_schema":{"type":"object"}}]`
	for _, tt := range []struct{ name, body, want string }{
		{"result for another id", `{"model":"` + testModel + `","max_tokens":10,` + tools + `,"messages":[{"role":"user","content":"a"},` + toolUse +
			`,{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_2","content":"x"}]}]}`,
			"messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_2"},
		{"no result", `{"model":"` + testModel + `","max_tokens":10,` + tools + `,"messages":[{"role":"user","content":"a"},` + toolUse +
			`,{"role":"user","content":"b"}]}`,
			"messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_1"},
		{"result without id", `{"model":"` + testModel + `","max_tokens":10,"messages":[{"role":"user","content":[{"type":"tool_result","content":"x"}]}]}`,
			"messages.0.content.0.tool_use_id: Field required"},
		{"tool_use from the user", `{"model":"` + testModel + `","max_tokens":10,"messages":[{"role":"user","content":[{"type":"tool_use","id":"t","name":"n","input":{}}]}]}`,
			"messages.0.content.0: `tool_use` blocks can only be in `assistant` messages"},
		{"tool without a name", `{"model":"` + testModel + `","max_tokens":10,"tools":[{"input_schema":{}}],"messages":[{"role":"user","content":"a"}]}`,
			"tools.0.name: Field required"},
		{"tool without a schema", `{"model":"` + testModel + `","max_tokens":10,"tools":[{"name":"x"}],"messages":[{"role":"user","content":"a"}]}`,
			"tools.0.input_schema: Field required"},
		{"tool_choice names no tool", `{"model":"` + testModel + `","max_tokens":10,` + tools + `,"tool_choice":{"type":"tool","name":"nope"},"messages":[{"role":"user","content":"a"}]}`,
			"tool_choice.tool.name: Tool 'nope' not found in tools"},
		{"small thinking budget", `{"model":"` + testModel + `","max_tokens":5000,"thinking":{"type":"enabled","budget_tokens":100},"messages":[{"role":"user","content":"a"}]}`,
			"thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"},
		{"budget over max_tokens", `{"model":"` + testModel + `","max_tokens":1024,"thinking":{"type":"enabled","budget_tokens":1024},"messages":[{"role":"user","content":"a"}]}`,
			"`max_tokens` must be greater than `thinking.budget_tokens`."},
	} {
		res, b := post(t, srv, "/v1/messages", tt.body, nil)
		e := decodeError(t, res, b)
		if res.StatusCode != http.StatusBadRequest || e.Error.Type != "invalid_request_error" || !strings.HasPrefix(e.Error.Message, tt.want) {
			t.Errorf("%s: %d %q, want 400 %q", tt.name, res.StatusCode, e.Error.Message, tt.want)
		}
	}
}

func TestCitations(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{})
	client := newClient(srv)
	whole, kinds := streamAndWhole(t, client, userParams("Cite me [[citations]] [[reply_tokens=3]]", 50))
	if count(kinds, "content_block_delta:citations_delta") != 1 || len(whole.Content[0].Citations) != 1 ||
		whole.Content[0].Citations[0].Type != "char_location" || whole.Content[0].Citations[0].CitedText == "" {
		t.Errorf("events %v, content %+v: want one citations_delta and a char_location citation", kinds, whole.Content)
	}
}

// TestUnknownEvent: [[unknown_event]] sends an event and a block of types
// no client knows; the SDK passes over them.
func TestUnknownEvent(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{})
	res, b := post(t, srv, "/v1/messages", rawBody("x [[unknown_event]] [[reply_tokens=2]]", 10, true), nil)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("%d %s", res.StatusCode, b)
	}
	events := readEvents(t, b)
	want := []string{"message_start", "ping", "content_block_future", "content_block_start", "content_block_delta", "content_block_stop",
		"content_block_start", "content_block_delta", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}
	if diff := cmp.Diff(want, eventNames(events)); diff != "" {
		t.Fatalf("events (-want +got):\n%s", diff)
	}
	if !strings.Contains(events[3].data, `"type":"future_block"`) || !strings.Contains(events[4].data, `"type":"future_delta"`) {
		t.Errorf("unknown block %s %s", events[3].data, events[4].data)
	}
	whole, _ := streamAndWhole(t, newClient(srv), userParams("x [[unknown_event]] [[reply_tokens=2]]", 10))
	if len(whole.Content) != 2 || whole.Content[0].Type != "future_block" {
		t.Errorf("content %+v: want the future block, then text", whole.Content)
	}
}

// TestDeltaFields: [[delta_fields]] adds fields beyond stop_reason and
// stop_sequence to message_delta's delta (stop_details, container, and one
// no client knows), and the whole message has the same at its top level;
// without it the delta has only the two.
func TestDeltaFields(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{})
	const text = "x [[delta_fields]] [[reply_tokens=2]]"
	deltaOf := func(body []byte) map[string]json.RawMessage {
		t.Helper()
		for _, ev := range readEvents(t, body) {
			if ev.name == "message_delta" {
				var d struct {
					Delta map[string]json.RawMessage `json:"delta"`
				}
				if err := json.Unmarshal([]byte(ev.data), &d); err != nil {
					t.Fatal(err)
				}
				return d.Delta
			}
		}
		t.Fatalf("no message_delta in %s", body)
		return nil
	}
	res, b := post(t, srv, "/v1/messages", rawBody(text, 10, true), nil)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("%d %s", res.StatusCode, b)
	}
	delta := deltaOf(b)
	var keys []string
	for k := range delta {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if diff := cmp.Diff([]string{"container", "future_field", "stop_details", "stop_reason", "stop_sequence"}, keys); diff != "" {
		t.Fatalf("delta %v (-want +got):\n%s", delta, diff)
	}
	if string(delta["stop_details"]) != "null" || !strings.Contains(string(delta["container"]), `"id":"container_011`) {
		t.Errorf("delta %s %s", delta["stop_details"], delta["container"])
	}
	res, b = post(t, srv, "/v1/messages", rawBody(text, 10, false), nil)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("%d %s", res.StatusCode, b)
	}
	var whole map[string]json.RawMessage
	if err := json.Unmarshal(b, &whole); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if string(whole[k]) != string(delta[k]) {
			t.Errorf("message's %s is %s, the delta's %s: want the same", k, whole[k], delta[k])
		}
	}
	// The SDK accumulates them into the message, as it reads the whole one.
	client := newClient(srv)
	w, _ := streamAndWhole(t, client, userParams(text, 10))
	if w.Container.ID == "" || !strings.Contains(w.RawJSON(), `"future_field"`) {
		t.Errorf("whole message %s: want its container and future_field", w.RawJSON())
	}
	acc, _ := streamed(t, client, userParams(text, 10))
	if acc.Container.ID != w.Container.ID || !strings.Contains(acc.RawJSON(), `"future_field"`) {
		t.Errorf("streamed message %s: want the container and future_field of %s", acc.RawJSON(), w.RawJSON())
	}
	_, b = post(t, srv, "/v1/messages", rawBody("x [[reply_tokens=2]]", 10, true), nil)
	if d := deltaOf(b); len(d) != 2 {
		t.Errorf("delta without the directive %v: want stop_reason and stop_sequence only", d)
	}
}
