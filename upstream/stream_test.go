package upstream_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/upstream"
)

const key = "sk-ant-test"

func fake(t *testing.T) *httptest.Server {
	t.Helper()
	f, err := fakeanthropic.New(fakeanthropic.Config{APIKeys: []string{key}})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return srv
}

func body(t *testing.T, text string, extra map[string]any) []byte {
	t.Helper()
	m := map[string]any{"model": "claude-sonnet-4-6", "max_tokens": 4000,
		"messages": []any{map[string]any{"role": "user", "content": text}}}
	for k, v := range extra {
		m[k] = v
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// whole is the fake's non-streaming answer to b.
func whole(t *testing.T, srv *httptest.Server, b []byte) map[string]any {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v1/messages", bytes.NewReader(b))
	req.Header.Set("x-api-key", key)
	req.Header.Set("anthropic-version", "2023-06-01")
	req.Header.Set("content-type", "application/json")
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("%d %s", resp.StatusCode, raw)
	}
	return m
}

// withoutIDs drops the ids that differ between two calls.
func withoutIDs(m map[string]any) map[string]any {
	delete(m, "id")
	for _, b := range m["content"].([]any) {
		delete(b.(map[string]any), "id")
	}
	return m
}

// TestStreamParts: every content block reaches onPart in order (plain text
// as text parts with their block's index, every other block framed by
// start and stop parts, unknown events whole), and the accumulated result
// is the message the non-streaming API returns.
func TestStreamParts(t *testing.T) {
	srv := fake(t)
	c := upstream.New(upstream.Options{BaseURL: srv.URL, APIKey: key})
	defer c.Close()
	tools := []any{map[string]any{"name": "lookup", "input_schema": map[string]any{"properties": map[string]any{"q": map[string]any{"type": "string"}}}}}
	b := body(t, "go [[thinking_tokens=2]] [[reply_tokens=2]] [[tool_use=lookup]] [[unknown_event]]",
		map[string]any{"tools": tools, "thinking": map[string]any{"type": "enabled", "budget_tokens": 1024}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var parts []string
	res, err := c.Stream(ctx, b, nil, func(p upstream.Part) {
		s := map[upstream.PartKind]string{upstream.PartText: "text", upstream.PartBlockStart: "start", upstream.PartBlockDelta: "delta",
			upstream.PartBlockStop: "stop", upstream.PartEvent: "event"}[p.Kind]
		var typ struct{ Type string }
		_ = json.Unmarshal(p.Raw, &typ)
		if typ.Type != "" {
			s += ":" + typ.Type
		}
		parts = append(parts, s+"@"+string(rune('0'+p.Index)))
	})
	if err != nil {
		t.Fatal(err)
	}
	// The tool input {"q":"…three words…"} is at most 30 bytes: 3 or 4 pieces.
	got := strings.Join(parts, " ")
	want := "event:content_block_future@0 start:thinking@0 delta:thinking_delta@0 delta:thinking_delta@0 delta:signature_delta@0 stop@0 " +
		"start:future_block@1 delta:future_delta@1 stop@1 text@2 text@2 start:tool_use@3 delta:input_json_delta@3 delta:input_json_delta@3"
	if !strings.HasPrefix(got, want) || !strings.HasSuffix(got, "delta:input_json_delta@3 stop@3") {
		t.Fatalf("parts\n%s\nwant\n%s … stop@3", got, want)
	}
	var streamed map[string]any
	if err := json.Unmarshal(res.Message, &streamed); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(withoutIDs(whole(t, srv, b)), withoutIDs(streamed)); diff != "" {
		t.Errorf("accumulated result differs from the non-streaming message (-whole +streamed):\n%s", diff)
	}
	if res.Usage.OutputTokens == 0 || strings.Count(res.Text, " ") != 2 {
		t.Errorf("usage %+v, text %q", res.Usage, res.Text)
	}
}

// TestStreamKeepsEveryDeltaField: fields of message_delta's delta beyond
// stop_reason and stop_sequence (stop_details, container, one no client
// knows) are the result's at its top level, as in the non-streaming
// message.
func TestStreamKeepsEveryDeltaField(t *testing.T) {
	srv := fake(t)
	c := upstream.New(upstream.Options{BaseURL: srv.URL, APIKey: key})
	defer c.Close()
	b := body(t, "go [[delta_fields]] [[reply_tokens=3]]", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := c.Stream(ctx, b, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	var streamed map[string]any
	if err := json.Unmarshal(res.Message, &streamed); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"stop_details", "container", "future_field", "context_management"} {
		if _, ok := streamed[k]; !ok {
			t.Errorf("result %s has no %s", res.Message, k)
		}
	}
	if diff := cmp.Diff(withoutIDs(whole(t, srv, b)), withoutIDs(streamed)); diff != "" {
		t.Errorf("accumulated result differs from the non-streaming message (-whole +streamed):\n%s", diff)
	}
	if !strings.Contains(string(res.Message), `"stop_sequence":null,"stop_details":null,"usage":`) {
		t.Errorf("result %s: want stop_details after stop_sequence, as the API orders them", res.Message)
	}
}
