package api_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/anthropics/anthropic-sdk-go/v2/option"
	"github.com/google/go-cmp/cmp"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
)

// Every content block streams: through the job event log (block_start,
// block_delta, block_stop beside text deltas) and through /v1/messages
// (the upstream's own events, relayed).

var weatherTool = anthropic.ToolParam{
	Name: "get_weather",
	InputSchema: anthropic.ToolInputSchemaParam{Properties: map[string]any{
		"location": map[string]any{"type": "string"},
		"country":  map[string]any{"type": "string"},
		"unit":     map[string]any{"type": "string", "enum": []string{"celsius", "fahrenheit"}},
	}},
}

func toolParams(user, text string, maxTokens int64) anthropic.MessageNewParams {
	p := params(user, text, maxTokens)
	p.Tools = []anthropic.ToolUnionParam{{OfTool: &weatherTool}}
	return p
}

func thinkingParams(user, text string) anthropic.MessageNewParams {
	p := params(user, text, 4000)
	p.Thinking = anthropic.ThinkingConfigParamOfEnabled(2000)
	return p
}

// directClient talks to the fake upstream itself.
func directClient(e *harness.Env) anthropic.Client {
	return anthropic.NewClient(option.WithoutEnvironmentDefaults(), option.WithBaseURL(e.Upstream.URL),
		option.WithAPIKey(harness.UpstreamKey), option.WithMaxRetries(0))
}

// block is what a content block says; ids are left out where calls differ.
type block struct {
	Type, Text, Thinking, Signature, Name, Data, ID string
	Input, Citations                                string
}

func blocks(t *testing.T, m anthropic.Message, withIDs bool) []block {
	t.Helper()
	var out []block
	for _, b := range m.Content {
		x := block{Type: b.Type, Text: b.Text, Thinking: b.Thinking, Signature: b.Signature, Name: b.Name, Data: b.Data}
		if withIDs {
			x.ID = b.ID
		}
		if len(b.Input) > 0 {
			var v any
			if err := json.Unmarshal(b.Input, &v); err != nil {
				t.Fatalf("input %q: %v", b.Input, err)
			}
			c, _ := json.Marshal(v)
			x.Input = string(c)
		}
		for _, c := range b.Citations {
			x.Citations += c.Type + ":" + c.CitedText + ";"
		}
		out = append(out, x)
	}
	return out
}

// streamed runs a streaming call and returns the accumulated message and
// the kinds of its events (block and delta types; consecutive text deltas
// counted once, since sluice may join them).
func streamed(t *testing.T, client anthropic.Client, p anthropic.MessageNewParams) (anthropic.Message, []string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream := client.Messages.NewStreaming(ctx, p)
	defer stream.Close()
	var acc anthropic.Message
	var kinds []string
	for stream.Next() {
		ev := stream.Current()
		k := ev.Type
		switch ev.Type {
		case "content_block_start":
			k += ":" + ev.ContentBlock.Type
		case "content_block_delta":
			k += ":" + ev.Delta.Type
		}
		if k != "content_block_delta:text_delta" || len(kinds) == 0 || kinds[len(kinds)-1] != k {
			kinds = append(kinds, k)
		}
		if err := acc.Accumulate(ev); err != nil {
			t.Fatalf("Accumulate: %v", err)
		}
	}
	return acc, kinds, stream.Err()
}

// sameTurn checks that p answered through sluice (streaming and not) is the
// message the fake gives directly (ids aside), event for event.
func sameTurn(t *testing.T, e *harness.Env, p anthropic.MessageNewParams) anthropic.Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sluice, direct := sdkClient(e), directClient(e)
	up := p
	up.Metadata = anthropic.MetadataParam{}
	want, err := direct.Messages.New(ctx, up)
	if err != nil {
		t.Fatal(err)
	}
	got, err := sluice.Messages.New(ctx, p)
	if err != nil {
		t.Fatalf("Messages.New through sluice: %v", err)
	}
	if diff := cmp.Diff(blocks(t, *want, false), blocks(t, *got, false)); diff != "" {
		t.Errorf("Messages.New through sluice differs from the fake's (-fake +sluice):\n%s", diff)
	}
	if got.StopReason != want.StopReason || got.Usage.OutputTokens != want.Usage.OutputTokens || got.Usage.InputTokens != want.Usage.InputTokens {
		t.Errorf("stop %q, usage %d/%d: want %q, %d/%d", got.StopReason, got.Usage.InputTokens, got.Usage.OutputTokens,
			want.StopReason, want.Usage.InputTokens, want.Usage.OutputTokens)
	}
	wantAcc, wantKinds, err := streamed(t, direct, up)
	if err != nil {
		t.Fatal(err)
	}
	gotAcc, gotKinds, err := streamed(t, sluice, p)
	if err != nil {
		t.Fatalf("stream through sluice: %v", err)
	}
	if diff := cmp.Diff(wantKinds, gotKinds); diff != "" {
		t.Errorf("streamed events through sluice differ from the fake's (-fake +sluice):\n%s", diff)
	}
	if diff := cmp.Diff(blocks(t, wantAcc, false), blocks(t, gotAcc, false)); diff != "" {
		t.Errorf("streamed message through sluice differs from the fake's (-fake +sluice):\n%s", diff)
	}
	if diff := cmp.Diff(blocks(t, *got, false), blocks(t, gotAcc, false)); diff != "" {
		t.Errorf("streamed and whole messages differ (-whole +streamed):\n%s", diff)
	}
	if gotAcc.StopReason != want.StopReason || gotAcc.Usage.OutputTokens != want.Usage.OutputTokens || gotAcc.Usage.InputTokens != want.Usage.InputTokens {
		t.Errorf("streamed stop %q, usage %d/%d: want %q, %d/%d", gotAcc.StopReason, gotAcc.Usage.InputTokens, gotAcc.Usage.OutputTokens,
			want.StopReason, want.Usage.InputTokens, want.Usage.OutputTokens)
	}
	return *got
}

func TestMessagesToolUseTurn(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	got := sameTurn(t, e, toolParams("alice", "Weather in Paris? [[reply_tokens=3]] [[tool_use=get_weather]]", 300))
	if got.StopReason != anthropic.StopReasonToolUse || len(got.Content) != 2 || got.Content[1].Type != "tool_use" {
		t.Fatalf("message %+v: want text then tool_use, stop tool_use", got)
	}
}

func TestMessagesThinkingTurn(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	got := sameTurn(t, e, thinkingParams("alice", "Think [[thinking_tokens=6]] [[redacted_thinking]] [[citations]] [[reply_tokens=4]]"))
	want := []string{"thinking", "redacted_thinking", "text"}
	var types []string
	for _, b := range got.Content {
		types = append(types, b.Type)
	}
	if diff := cmp.Diff(want, types); diff != "" || got.Content[0].Signature == "" || len(got.Content[2].Citations) != 1 {
		t.Fatalf("blocks %v (-want +got):\n%s\nmessage %+v", types, diff, got)
	}
}

// TestMessagesToolResultCompletesTheConversation: the tool call (with the
// thinking before it, whose signature the fake checks) goes back with its
// result, through sluice, and the conversation ends with an answer.
func TestMessagesToolResultCompletesTheConversation(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	client := sdkClient(e)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p := thinkingParams("alice", "Weather? [[tool_use=get_weather]]")
	p.Tools = []anthropic.ToolUnionParam{{OfTool: &weatherTool}}
	first, _, err := streamed(t, client, p)
	if err != nil {
		t.Fatal(err)
	}
	if first.StopReason != anthropic.StopReasonToolUse || len(first.Content) != 2 || first.Content[1].Type != "tool_use" {
		t.Fatalf("first turn %+v", first)
	}
	p.Messages = append(p.Messages, first.ToParam(),
		anthropic.NewUserMessage(anthropic.NewToolResultBlock(first.Content[1].ID, "Sunny, 21 °C [[reply_tokens=5]]", false)))
	second, err := client.Messages.New(ctx, p)
	if err != nil {
		t.Fatalf("second turn: %v", err)
	}
	last := second.Content[len(second.Content)-1]
	if second.StopReason != anthropic.StopReasonEndTurn || last.Type != "text" || len(strings.Fields(last.Text)) != 5 {
		t.Fatalf("second turn %+v: want a 5-word answer, end_turn", second)
	}
	// The same refusal as the API's for a result without its call.
	p.Messages = append(p.Messages[:1], anthropic.NewUserMessage(anthropic.NewToolResultBlock("toolu_nope", "x", false)))
	_, err = client.Messages.New(ctx, p)
	var ae *anthropic.Error
	if !errors.As(err, &ae) || ae.StatusCode != 400 || !strings.Contains(ae.Message, "unexpected `tool_use_id`") {
		t.Fatalf("tool result without its call: %v", err)
	}
}

// rawEvent is one server-sent event as sent.
type rawEvent struct{ name, data string }

func readRaw(t *testing.T, r io.Reader) []rawEvent {
	t.Helper()
	var out []rawEvent
	scanRaw(r, func(ev rawEvent) bool { out = append(out, ev); return true })
	return out
}

// scanRaw reads server-sent events from r and hands each to emit, until
// the stream ends or emit returns false.
func scanRaw(r io.Reader, emit func(rawEvent) bool) {
	var ev rawEvent
	sc := bufio.NewScanner(r)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if ev.name != "" && !emit(ev) {
				return
			}
			ev = rawEvent{}
		case strings.HasPrefix(line, "event: "):
			ev.name = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			ev.data = strings.TrimPrefix(line, "data: ")
		}
	}
}

func postStream(t *testing.T, url, key string, body any) []rawEvent {
	t.Helper()
	b, _ := json.Marshal(body)
	req, _ := http.NewRequest(http.MethodPost, url+"/v1/messages", strings.NewReader(string(b)))
	req.Header.Set("content-type", "application/json")
	req.Header.Set("x-api-key", key)
	req.Header.Set("anthropic-version", "2023-06-01")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	return readRaw(t, resp.Body)
}

// TestMessagesUnknownEventsPassThrough: an event type and a block type
// sluice does not know reach the client exactly as the upstream sent them.
func TestMessagesUnknownEventsPassThrough(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	body := map[string]any{"model": harness.Model, "max_tokens": 50, "stream": true,
		"messages": []any{map[string]any{"role": "user", "content": "x [[unknown_event]] [[reply_tokens=2]]"}}}
	direct := postStream(t, e.Upstream.URL, harness.UpstreamKey, body)
	body["metadata"] = map[string]any{"user_id": "alice"}
	through := postStream(t, e.API.URL, harness.TenantKey, body)
	pick := func(evs []rawEvent) []rawEvent {
		var out []rawEvent
		for _, ev := range evs {
			if ev.name == "content_block_future" || strings.Contains(ev.data, "future_") {
				out = append(out, ev)
			}
		}
		return out
	}
	want := pick(direct)
	if len(want) != 3 {
		t.Fatalf("the fake sent %v: want an unknown event, and an unknown block's start and delta", want)
	}
	if diff := cmp.Diff(want, pick(through), cmp.AllowUnexported(rawEvent{})); diff != "" {
		t.Errorf("unknown events through sluice (-fake +sluice):\n%s", diff)
	}
	// The fake paces its text: two tokens come as one delta or two, so a
	// run of deltas counts as one.
	var names []string
	for _, ev := range through {
		if ev.name == "ping" || ev.name == "content_block_delta" && len(names) > 0 && names[len(names)-1] == ev.name {
			continue
		}
		names = append(names, ev.name)
	}
	wantNames := []string{"message_start", "content_block_future", "content_block_start", "content_block_delta", "content_block_stop",
		"content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}
	if diff := cmp.Diff(wantNames, names); diff != "" {
		t.Errorf("events through sluice (-want +got):\n%s", diff)
	}
}

// TestMessageDeltaFieldsReachEveryAnswer: the fields of the upstream's
// message_delta beyond stop_reason and stop_sequence (stop_details,
// container, one no client knows) reach the client in the message_delta
// of a /v1/messages stream as the upstream sent them, are the top-level
// fields of the Message without stream and of a job's result, and the
// SDK accumulates them as it would from the API.
func TestMessageDeltaFieldsReachEveryAnswer(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	const text = "fields [[delta_fields]] [[reply_tokens=3]]"
	body := map[string]any{"model": harness.Model, "max_tokens": 50, "stream": true,
		"messages": []any{map[string]any{"role": "user", "content": text}}}
	deltaOf := func(evs []rawEvent) map[string]json.RawMessage {
		t.Helper()
		for _, ev := range evs {
			if ev.name == "message_delta" {
				var d struct {
					Delta             map[string]json.RawMessage `json:"delta"`
					ContextManagement json.RawMessage            `json:"context_management"`
				}
				if err := json.Unmarshal([]byte(ev.data), &d); err != nil {
					t.Fatal(err)
				}
				// The event's own field beside the delta, under a name
				// no delta field has.
				d.Delta["event.context_management"] = d.ContextManagement
				return d.Delta
			}
		}
		t.Fatalf("no message_delta in %v", evs)
		return nil
	}
	want := deltaOf(postStream(t, e.Upstream.URL, harness.UpstreamKey, body))
	if len(want) != 6 || len(want["event.context_management"]) == 0 {
		t.Fatalf("the fake's delta %v: want five fields and the event's context_management", want)
	}
	body["metadata"] = map[string]any{"user_id": "alice"}
	got := deltaOf(postStream(t, e.API.URL, harness.TenantKey, body))
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("message_delta's delta through sluice (-fake +sluice):\n%s", diff)
	}
	// Every one is a top-level field of the whole Message and of a job's result.
	hasFields := func(what string, raw []byte) {
		t.Helper()
		var m map[string]json.RawMessage
		if err := json.Unmarshal(raw, &m); err != nil {
			t.Fatalf("%s %s: %v", what, raw, err)
		}
		for k, v := range want {
			k = strings.TrimPrefix(k, "event.")
			if string(m[k]) != string(v) {
				t.Errorf("%s's %s is %s: want %s", what, k, m[k], v)
			}
		}
	}
	body["stream"] = false
	resp, b := e.Do(t, http.MethodPost, "/v1/messages", harness.TenantKey, body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	hasFields("the Message", b)
	v := e.Submit(t, harness.JobBody("alice", text))
	job := e.WaitTerminal(t, v.ID, 30*time.Second)
	if job.Status != jobs.Succeeded {
		t.Fatalf("job %+v", job)
	}
	hasFields("the job's result", job.Result)
	// The SDK's accumulated message holds them as the whole one does.
	p := params("alice", text, 50)
	client := sdkClient(e)
	acc, _, err := streamed(t, client, p)
	if err != nil {
		t.Fatal(err)
	}
	whole, err := client.Messages.New(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	if acc.Container.ID == "" || acc.Container.ID != whole.Container.ID || !acc.Container.ExpiresAt.Equal(whole.Container.ExpiresAt) ||
		!strings.Contains(acc.RawJSON(), `"future_field":{"detail":`) || !strings.Contains(whole.RawJSON(), `"future_field":{"detail":`) ||
		!strings.Contains(whole.RawJSON(), `"context_management":{"applied_edits":[]}`) { // (the SDK's Message accumulator, unlike BetaMessage's, leaves the event's own fields out)
		t.Errorf("accumulated %s\nwhole %s\nwant the same container, future_field and context_management", acc.RawJSON(), whole.RawJSON())
	}
}

// TestMessagesRetryAfterBytesEndsWithTheAPIsError: an attempt that fails
// after content was sent ends the stream with the error event the API
// sends mid-stream, typed by what failed, and the request is canceled:
// nobody will read its answer, so the upstream never completes a second
// call for it. Before any content a retry is invisible.
func TestMessagesRetryAfterBytesEndsWithTheAPIsError(t *testing.T) {
	e := harness.Start(t, harness.Options{Fake: fakeanthropic.Config{TokensPerSecond: 40}})
	client := sdkClient(e)
	for _, tt := range []struct {
		fault fakeanthropic.FaultKind
		typ   string
	}{{fakeanthropic.FaultStreamError, "overloaded_error"}, {fakeanthropic.FaultStreamCut, "api_error"}} {
		idle(t, e)
		before := len(e.Fake.Stats().Log)
		e.Fake.QueueFaults(fakeanthropic.FaultRule{Kind: tt.fault})
		acc, _, err := streamed(t, client, params("alice", "long [[reply_tokens=30]] "+string(tt.fault), 100))
		var ae *anthropic.Error
		if !errors.As(err, &ae) || string(ae.Type()) != tt.typ {
			t.Fatalf("%s: stream ended with %v, want an %s event", tt.fault, err, tt.typ)
		}
		if len(acc.Content) != 1 || acc.Content[0].Text == "" {
			t.Errorf("%s: %+v before the error: want the text sent", tt.fault, acc.Content)
		}
		id := "job_" + strings.TrimPrefix(acc.ID, "msg_")
		harness.Eventually(t, 10*time.Second, func() bool { return e.Get(t, id).Status == jobs.Canceled }, "%s: the job to be canceled", tt.fault)
		idle(t, e)
		calls := e.Fake.Stats().Log[before:]
		if len(calls) == 0 || calls[0].Fault != tt.fault {
			t.Fatalf("%s: calls %+v: want the faulted one first", tt.fault, calls)
		}
		for _, c := range calls {
			if c.Complete {
				t.Errorf("%s: the upstream completed a call (%+v) for a request whose client already had its error", tt.fault, c)
			}
		}
	}
	idle(t, e)
	e.Fake.QueueFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultOverloaded})
	acc, _, err := streamed(t, client, params("alice", "again [[reply_tokens=3]]", 100))
	if err != nil || len(strings.Fields(acc.Content[0].Text)) != 3 {
		t.Fatalf("a retry before any content: %v, %+v", err, acc)
	}
	if v := e.Get(t, "job_"+strings.TrimPrefix(acc.ID, "msg_")); v.Status != jobs.Succeeded || v.Attempts != 2 {
		t.Fatalf("a retry before any content: job %s after %d attempts, want succeeded after 2", v.Status, v.Attempts)
	}
	resp, b := e.Do(t, http.MethodGet, "/v1/users/alice/usage", harness.TenantKey, nil)
	var u struct{ Queued, Running int }
	if err := json.Unmarshal(b, &u); err != nil || resp.StatusCode != http.StatusOK || u.Queued != 0 || u.Running != 0 {
		t.Fatalf("alice's usage %d %s: want nothing queued or running", resp.StatusCode, b)
	}
}

// idle waits until no call of the harness's group is running or about to
// (no concurrency lease is held) and the fake serves none, so that a fault
// queued next goes to the next request's call and not to an earlier job's.
func idle(t *testing.T, e *harness.Env) {
	t.Helper()
	harness.Eventually(t, 30*time.Second, func() bool {
		g, err := e.Sched.Gauges(context.Background(), &e.Config.ModelGroups[0])
		return err == nil && g.InFlight == 0 && g.Queued == 0 && e.Fake.Stats().InFlight == 0
	}, "the group to be idle")
}

// jobEventsAsStream turns a job's events into the upstream's stream events
// (as an SDK client would get them), for Message.Accumulate.
func jobEventsAsStream(t *testing.T, evs []harness.SSEEvent) []anthropic.MessageStreamEventUnion {
	t.Helper()
	var out []anthropic.MessageStreamEventUnion
	add := func(raw string) {
		var u anthropic.MessageStreamEventUnion
		if err := json.Unmarshal([]byte(raw), &u); err != nil {
			t.Fatalf("%s: %v", raw, err)
		}
		out = append(out, u)
	}
	add(`{"type":"message_start","message":{"id":"msg_x","type":"message","role":"assistant","model":"m","content":[],"usage":{}}}`)
	started := -1 // the last block started
	openText := -1
	closeText := func() {
		if openText >= 0 {
			add(`{"type":"content_block_stop","index":` + strconv.Itoa(openText) + `}`)
			openText = -1
		}
	}
	for _, ev := range evs {
		switch ev.Event {
		case "started":
			out, started, openText = out[:1], -1, -1 // an abandoned attempt's blocks are discarded
		case "delta":
			var d struct {
				Text  string `json:"text"`
				Index int    `json:"index"`
			}
			_ = json.Unmarshal([]byte(ev.Data), &d)
			if d.Index > started {
				closeText()
				add(`{"type":"content_block_start","index":` + strconv.Itoa(d.Index) + `,"content_block":{"type":"text","text":""}}`)
				started, openText = d.Index, d.Index
			}
			b, _ := json.Marshal(d.Text)
			add(`{"type":"content_block_delta","index":` + strconv.Itoa(d.Index) + `,"delta":{"type":"text_delta","text":` + string(b) + `}}`)
		case "block_start":
			closeText()
			var d struct{ Index int }
			_ = json.Unmarshal([]byte(ev.Data), &d)
			started = d.Index
			add(`{"type":"content_block_start",` + ev.Data[1:])
		case "block_delta":
			add(`{"type":"content_block_delta",` + ev.Data[1:])
		case "block_stop":
			add(`{"type":"content_block_stop",` + ev.Data[1:])
		case "succeeded":
			closeText()
			add(`{"type":"message_stop"}`)
		}
	}
	return out
}

func TestJobEventsCarryEveryBlock(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	body := map[string]any{"user_id": "alice", "request": map[string]any{
		"model": harness.Model, "max_tokens": 4000, "thinking": map[string]any{"type": "enabled", "budget_tokens": 2000},
		"tools":    []any{map[string]any{"name": "get_weather", "input_schema": weatherTool.InputSchema}},
		"messages": []any{map[string]any{"role": "user", "content": "Weather? [[thinking_tokens=4]] [[citations]] [[reply_tokens=3]] [[tool_use=get_weather]]"}}}}
	v := e.Submit(t, body)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	evs := e.Events(t, ctx, v.ID, harness.TenantKey, "")
	got := e.Get(t, v.ID)
	if got.Status != jobs.Succeeded {
		t.Fatalf("job %s", got.Status)
	}
	var result anthropic.Message
	if err := json.Unmarshal(got.Result, &result); err != nil {
		t.Fatal(err)
	}
	var acc anthropic.Message
	for _, ev := range jobEventsAsStream(t, evs) {
		if err := acc.Accumulate(ev); err != nil {
			t.Fatalf("Accumulate: %v", err)
		}
	}
	if diff := cmp.Diff(blocks(t, result, true), blocks(t, acc, true)); diff != "" {
		t.Fatalf("the job's events accumulate to another message than its result (-result +events):\n%s", diff)
	}
	var types []string
	for _, b := range result.Content {
		types = append(types, b.Type)
	}
	if diff := cmp.Diff([]string{"thinking", "text", "tool_use"}, types); diff != "" {
		t.Fatalf("result blocks (-want +got):\n%s", diff)
	}

	// Resume in the middle of the tool call: exactly the events after it.
	var toolDeltas []int
	for i, ev := range evs {
		if ev.Event == "block_delta" && strings.Contains(ev.Data, `"input_json_delta"`) {
			toolDeltas = append(toolDeltas, i)
		}
	}
	if len(toolDeltas) < 4 {
		t.Fatalf("%d input_json_delta events: want several", len(toolDeltas))
	}
	mid := toolDeltas[len(toolDeltas)/2]
	rest := e.Events(t, ctx, v.ID, harness.TenantKey, evs[mid].ID)
	if diff := cmp.Diff(evs[mid+1:], rest); diff != "" {
		t.Fatalf("resumed after %s (-want +got):\n%s", evs[mid].ID, diff)
	}
	// The text keeps its old shape, with the block's index added.
	for _, ev := range evs {
		if ev.Event == "delta" && !strings.HasPrefix(ev.Data, `{"text":`) {
			t.Errorf("delta %s: want {\"text\", \"index\"}", ev.Data)
		}
	}
}

// TestJobRetryAfterACutToolCall: an attempt that fails partway through a
// tool call is followed by one that succeeds; the events after the last
// `started` accumulate, with the SDK, to exactly the job's result, and
// nothing of the abandoned attempt (its text, its half tool call and that
// call's id) reaches it. Every event of the abandoned attempt comes before
// its `retrying`.
func TestJobRetryAfterACutToolCall(t *testing.T) {
	e := harness.Start(t, harness.Options{Fake: fakeanthropic.Config{TokensPerSecond: 200}})
	for _, fault := range []fakeanthropic.FaultKind{fakeanthropic.FaultStreamCut, fakeanthropic.FaultStreamError} {
		t.Run(string(fault), func(t *testing.T) {
			e.Fake.QueueFaults(fakeanthropic.FaultRule{Kind: fault})
			body := map[string]any{"user_id": "alice", "request": map[string]any{
				"model": harness.Model, "max_tokens": 300,
				"tools":    []any{map[string]any{"name": "get_weather", "input_schema": weatherTool.InputSchema}},
				"messages": []any{map[string]any{"role": "user", "content": "Weather? " + string(fault) + " [[reply_tokens=2]] [[tool_use=get_weather]]"}}}}
			v := e.Submit(t, body)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			evs := e.Events(t, ctx, v.ID, harness.TenantKey, "")
			got := e.Get(t, v.ID)
			if got.Status != jobs.Succeeded || got.Attempts != 2 {
				t.Fatalf("job %s after %d attempts: want succeeded after 2", got.Status, got.Attempts)
			}
			var starts []int
			for i, ev := range evs {
				if ev.Event == "started" {
					starts = append(starts, i)
				}
			}
			if len(starts) != 2 {
				t.Fatalf("%d started events: want 2", len(starts))
			}
			// The abandoned attempt: its text, then a tool call begun and
			// cut, then retrying.
			first := evs[starts[0]+1 : starts[1]]
			var names []string
			cutID, pieces := "", 0
			for _, ev := range first {
				names = append(names, ev.Event)
				switch {
				case ev.Event == "block_start" && strings.Contains(ev.Data, `"tool_use"`):
					var d struct {
						ContentBlock struct{ ID string } `json:"content_block"`
					}
					_ = json.Unmarshal([]byte(ev.Data), &d)
					cutID = d.ContentBlock.ID
				case ev.Event == "block_delta" && strings.Contains(ev.Data, `"input_json_delta"`) && !strings.Contains(ev.Data, `"partial_json":""`):
					pieces++
				case ev.Event == "block_stop":
					t.Errorf("the abandoned attempt's tool call ended (%s): want it cut", ev.Data)
				}
			}
			if cutID == "" || pieces == 0 || names[0] != "delta" || names[len(names)-1] != "retrying" {
				t.Fatalf("the abandoned attempt's events %v: want text, a tool call begun with part of its input, then retrying", names)
			}

			var result anthropic.Message
			if err := json.Unmarshal(got.Result, &result); err != nil {
				t.Fatal(err)
			}
			var acc anthropic.Message
			for _, ev := range jobEventsAsStream(t, evs) { // what follows the last started
				if err := acc.Accumulate(ev); err != nil {
					t.Fatalf("Accumulate: %v", err)
				}
			}
			if diff := cmp.Diff(blocks(t, result, true), blocks(t, acc, true)); diff != "" {
				t.Fatalf("the events after the last started accumulate to another message than the result (-result +events):\n%s", diff)
			}
			if len(result.Content) != 2 || result.Content[1].Type != "tool_use" || result.Content[1].ID == cutID ||
				strings.Contains(string(got.Result), cutID) || len(strings.Fields(result.Content[0].Text)) != 2 {
				t.Fatalf("result %s: want its own text and tool call, nothing of the abandoned %s", got.Result, cutID)
			}
		})
	}
}
