package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/anthropics/anthropic-sdk-go/v2/option"
	"github.com/google/go-cmp/cmp"

	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/jobs"
)

// The official Go SDK, pointed at sluice, works unchanged.
func sdkClient(e *harness.Env) anthropic.Client {
	return anthropic.NewClient(option.WithoutEnvironmentDefaults(), option.WithBaseURL(e.API.URL),
		option.WithAPIKey(harness.TenantKey), option.WithMaxRetries(0))
}

func params(user, text string, maxTokens int64) anthropic.MessageNewParams {
	return anthropic.MessageNewParams{
		Model:     harness.Model,
		MaxTokens: maxTokens,
		Messages:  []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock(text))},
		Metadata:  anthropic.MetadataParam{UserID: anthropic.String(user)},
	}
}

func TestMessagesWithTheSDK(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	client := sdkClient(e)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	msg, err := client.Messages.New(ctx, params("alice", "Hello [[reply_tokens=6]]", 100))
	if err != nil {
		t.Fatal(err)
	}
	if len(msg.Content) != 1 || len(strings.Fields(msg.Content[0].Text)) != 6 || msg.Usage.OutputTokens != 6 || msg.StopReason != "end_turn" {
		t.Fatalf("message %+v", msg)
	}

	stream := client.Messages.NewStreaming(ctx, params("alice", "Hi again [[reply_tokens=5]]", 100))
	var acc anthropic.Message
	stopped := false
	for stream.Next() {
		ev := stream.Current()
		if err := acc.Accumulate(ev); err != nil {
			t.Fatal(err)
		}
		if ev.Type == "message_stop" {
			stopped = true
		}
	}
	if err := stream.Err(); err != nil {
		t.Fatal(err)
	}
	if !stopped || len(acc.Content) != 1 || len(strings.Fields(acc.Content[0].Text)) != 5 || acc.Usage.OutputTokens != 5 {
		t.Fatalf("streamed %+v (message_stop %v)", acc, stopped)
	}

	// count_tokens is passed through to the upstream.
	n, err := client.Messages.CountTokens(ctx, anthropic.MessageCountTokensParams{
		Model: harness.Model, Messages: []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock("hello"))},
	})
	if err != nil || n.InputTokens <= 0 {
		t.Fatalf("count_tokens: %v %v", n, err)
	}
}

func TestMessagesRefusalsAreAnthropicErrors(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, TenantExtra: "    requests_per_hour: 1\n    max_wait: 1s\n"})
	client := sdkClient(e)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	check := func(name string, err error, status int, typ string) {
		t.Helper()
		var ae *anthropic.Error
		if !errors.As(err, &ae) {
			t.Fatalf("%s: %v is not an *anthropic.Error", name, err)
		}
		if ae.StatusCode != status || string(ae.Type()) != typ || ae.Message == "" {
			t.Fatalf("%s: %d %s %q, want %d %s", name, ae.StatusCode, ae.Type(), ae.Message, status, typ)
		}
	}
	// Unknown model: 404, as upstream.
	p := params("u1", "hi", 10)
	p.Model = "gpt-4"
	_, err := client.Messages.New(ctx, p)
	check("unknown model", err, 404, "not_found_error")
	// Bad request: 400.
	_, err = client.Messages.New(ctx, anthropic.MessageNewParams{Model: harness.Model, MaxTokens: 10,
		Messages: []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock("hi"))}})
	check("no user", err, 400, "invalid_request_error")
	// Quota: the user's one request an hour is spent by a streamed request.
	sctx, scancel := context.WithCancel(ctx)
	stream := client.Messages.NewStreaming(sctx, params("u3", "hi", 10))
	defer stream.Close()
	_, err = client.Messages.New(ctx, params("u3", "hi", 10))
	scancel()
	if err == nil {
		t.Fatal("second request within a 1/hour quota accepted")
	}
	check("quota", err, 429, "rate_limit_error")
	var ae *anthropic.Error
	if errors.As(err, &ae) && (ae.Response.Header.Get("retry-after") == "" || !strings.Contains(ae.Message, "your 1 request for this hour")) {
		t.Fatalf("quota refusal: retry-after %q, message %q", ae.Response.Header.Get("retry-after"), ae.Message)
	}
	// Queue too long: 529. A frozen group makes any new job's wait longer
	// than the tenant's max_wait (1 s).
	if _, err := e.Sched.Freeze(ctx, &e.Config.ModelGroups[0], "429", time.Minute); err != nil {
		t.Fatal(err)
	}
	_, err = client.Messages.New(ctx, params("u2", "hi", 10))
	check("overloaded", err, 529, "overloaded_error")
}

// liveStream posts a streamed /v1/messages body and hands its events over
// as they arrive; the channel closes when the stream ends.
func liveStream(t *testing.T, e *harness.Env, body map[string]any) <-chan rawEvent {
	t.Helper()
	b, _ := json.Marshal(body)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, e.API.URL+"/v1/messages", bytes.NewReader(b))
	req.Header.Set("content-type", "application/json")
	req.Header.Set("x-api-key", harness.TenantKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		msg, _ := io.ReadAll(resp.Body)
		t.Fatalf("%d %s", resp.StatusCode, msg)
	}
	out := make(chan rawEvent, 64)
	go func() {
		defer close(out)
		defer resp.Body.Close()
		scanRaw(resp.Body, func(ev rawEvent) bool {
			select {
			case out <- ev:
				return true
			case <-ctx.Done():
				return false
			}
		})
	}()
	return out
}

// next is the stream's next event; ok is false when the stream ended.
func next(t *testing.T, evs <-chan rawEvent, within time.Duration) (rawEvent, bool) {
	t.Helper()
	select {
	case ev, ok := <-evs:
		return ev, ok
	case <-time.After(within):
		t.Fatalf("no event within %s", within)
		return rawEvent{}, false
	}
}

func streamBody(user, text string) map[string]any {
	return map[string]any{"model": harness.Model, "max_tokens": 100, "stream": true, "metadata": map[string]any{"user_id": user},
		"messages": []any{map[string]any{"role": "user", "content": text}}}
}

// TestMessagesStreamPingsWhileQueued: a streamed request that waits in the
// queue (the group's one slot is taken by a long call) gets ping events
// all the while, and its answer once the slot is free.
func TestMessagesStreamPingsWhileQueued(t *testing.T) {
	e := harness.Start(t, harness.Options{MaxConcurrency: 1, PingEvery: 20 * time.Millisecond})
	blocker := e.Submit(t, harness.JobBody("alice", "hold the only slot [[latency_ms=60000]]"))
	harness.Eventually(t, 10*time.Second, func() bool {
		return e.Get(t, blocker.ID).Status == jobs.Running && e.Fake.Stats().InFlight == 1
	}, "the first call to take the group's only slot")

	evs := liveStream(t, e, streamBody("bob", "my turn [[reply_tokens=3]]"))
	for pings := 0; pings < 4; pings++ { // the one at once, then one every 20 ms
		ev, ok := next(t, evs, 5*time.Second)
		if !ok || ev.name != "ping" {
			t.Fatalf("event %d %q (stream open: %v) while the request waits: want a ping", pings, ev.name, ok)
		}
	}
	resp, b := e.Do(t, http.MethodGet, "/v1/jobs?user_id=bob", harness.TenantKey, nil)
	var list struct{ Jobs []jobs.View }
	if err := json.Unmarshal(b, &list); err != nil || resp.StatusCode != http.StatusOK || len(list.Jobs) != 1 || list.Jobs[0].Status != jobs.Queued {
		t.Fatalf("bob's jobs %d %s: want one, still queued", resp.StatusCode, b)
	}
	if e.Fake.Stats().Requests != 1 {
		t.Fatalf("%d upstream calls: want only the first one's", e.Fake.Stats().Requests)
	}

	if resp, b := e.Do(t, http.MethodDelete, "/v1/jobs/"+blocker.ID, harness.TenantKey, nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("cancel the first call: %d %s", resp.StatusCode, b)
	}
	var names []string
	var text strings.Builder
	for {
		ev, ok := next(t, evs, 10*time.Second)
		if !ok {
			break
		}
		var d struct {
			Delta struct{ Text string } `json:"delta"`
		}
		if ev.name == "content_block_delta" && json.Unmarshal([]byte(ev.data), &d) == nil {
			text.WriteString(d.Delta.Text)
		}
		if ev.name == "ping" || ev.name == "content_block_delta" && len(names) > 0 && names[len(names)-1] == ev.name {
			continue
		}
		names = append(names, ev.name)
	}
	want := []string{"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}
	if diff := cmp.Diff(want, names); diff != "" || len(strings.Fields(text.String())) != 3 {
		t.Fatalf("events once the slot was free (-want +got):\n%s\ntext %q: want 3 words", diff, text.String())
	}
}
