package api_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/anthropics/anthropic-sdk-go/v2/option"

	"github.com/sluice-dev/sluice/internal/harness"
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
