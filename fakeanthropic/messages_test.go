package fakeanthropic_test

import (
	"encoding/json"
	"errors"
	"maps"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/google/go-cmp/cmp"

	"github.com/sluice-dev/sluice/fakeanthropic"
)

func TestSDKMessagesNew(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{APIKeys: []string{testKey}})
	client := newClient(srv)

	msg, err := client.Messages.New(ctxWithTimeout(t), userParams("Hello", 100))
	if err != nil {
		t.Fatalf("Messages.New: %v", err)
	}
	if !strings.HasPrefix(msg.ID, "msg_") {
		t.Errorf("id %q: want msg_…", msg.ID)
	}
	if len(msg.Content) != 1 || msg.Content[0].Type != "text" {
		t.Fatalf("content %+v: want one text block", msg.Content)
	}
	text := msg.Content[0].Text
	if words := strings.Fields(text); len(words) != fakeanthropic.DefaultReplyTokens || !strings.HasSuffix(text, " ") {
		t.Errorf("text %q: want %d words, each followed by a space", text, fakeanthropic.DefaultReplyTokens)
	}
	got := struct {
		Model                         string
		StopReason                    anthropic.StopReason
		StopSequence                  string
		Input, Output, CacheW, CacheR int64
	}{string(msg.Model), msg.StopReason, msg.StopSequence,
		msg.Usage.InputTokens, msg.Usage.OutputTokens, msg.Usage.CacheCreationInputTokens, msg.Usage.CacheReadInputTokens}
	want := got
	want.Model, want.StopReason, want.StopSequence = testModel, anthropic.StopReasonEndTurn, ""
	// 8 framing + 4 for the message + ceil(5/4) for "Hello".
	want.Input, want.Output, want.CacheW, want.CacheR = 14, fakeanthropic.DefaultReplyTokens, 0, 0
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("message (-want +got):\n%s", diff)
	}
}

func TestSDKStreamingMatchesNonStreaming(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{})
	client := newClient(srv)
	params := userParams("Tell me something [[reply_tokens=7]]", 100)

	whole, err := client.Messages.New(ctxWithTimeout(t), params)
	if err != nil {
		t.Fatalf("Messages.New: %v", err)
	}

	stream := client.Messages.NewStreaming(ctxWithTimeout(t), params)
	defer stream.Close()
	var acc anthropic.Message
	var types []string
	deltas := 0
	for stream.Next() {
		ev := stream.Current()
		types = append(types, ev.Type)
		if ev.Type == "content_block_delta" {
			deltas++
		}
		if err := acc.Accumulate(ev); err != nil {
			t.Fatalf("Accumulate: %v", err)
		}
	}
	if err := stream.Err(); err != nil {
		t.Fatalf("stream: %v", err)
	}
	if types[len(types)-1] != "message_stop" {
		t.Errorf("last event %q: want message_stop", types[len(types)-1])
	}
	if deltas != 7 {
		t.Errorf("%d content_block_delta events: want one per output token, 7", deltas)
	}
	type summary struct {
		Text          string
		StopReason    anthropic.StopReason
		Input, Output int64
	}
	want := summary{whole.Content[0].Text, whole.StopReason, whole.Usage.InputTokens, whole.Usage.OutputTokens}
	got := summary{acc.Content[0].Text, acc.StopReason, acc.Usage.InputTokens, acc.Usage.OutputTokens}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("streamed message differs from Messages.New (-want +got):\n%s", diff)
	}
	if want.Output != 7 {
		t.Errorf("output tokens %d: want 7 from the directive", want.Output)
	}
}

func TestReplyLength(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{ReplyTokens: 12})
	client := newClient(srv)
	tests := []struct {
		name      string
		prompt    string
		maxTokens int64
		stop      []string
		wantOut   int64
		wantStop  anthropic.StopReason
	}{
		{"config default", "hi", 100, nil, 12, anthropic.StopReasonEndTurn},
		{"directive", "hi [[reply_tokens=3]]", 100, nil, 3, anthropic.StopReasonEndTurn},
		{"capped by max_tokens", "hi [[reply_tokens=50]]", 10, nil, 10, anthropic.StopReasonMaxTokens},
		{"exactly max_tokens", "hi [[reply_tokens=10]]", 10, nil, 10, anthropic.StopReasonEndTurn},
		{"config default capped", "hi", 5, nil, 5, anthropic.StopReasonMaxTokens},
		{"empty reply", "hi [[reply_tokens=0]]", 5, nil, 0, anthropic.StopReasonEndTurn},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			msg, err := client.Messages.New(ctxWithTimeout(t), userParams(tt.prompt, tt.maxTokens))
			if err != nil {
				t.Fatal(err)
			}
			if msg.Usage.OutputTokens != tt.wantOut || msg.StopReason != tt.wantStop {
				t.Errorf("output %d, stop %q: want %d, %q", msg.Usage.OutputTokens, msg.StopReason, tt.wantOut, tt.wantStop)
			}
			if n := int64(len(strings.Fields(msg.Content[0].Text))); n != msg.Usage.OutputTokens {
				t.Errorf("%d words for %d output tokens", n, msg.Usage.OutputTokens)
			}
		})
	}
}

func TestStopSequence(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{})
	client := newClient(srv)
	params := userParams("hi [[reply_tokens=200]]", 300)
	full, err := client.Messages.New(ctxWithTimeout(t), params)
	if err != nil {
		t.Fatal(err)
	}
	words := strings.Fields(full.Content[0].Text)
	const stopWord = "queue" // inside the word "queueing"
	first := 0
	for first < len(words) && !strings.Contains(words[first], stopWord) {
		first++
	}
	if first == len(words) {
		t.Fatalf("no word contains %q in %q", stopWord, full.Content[0].Text)
	}

	params.StopSequences = []string{stopWord}
	msg, err := client.Messages.New(ctxWithTimeout(t), params)
	if err != nil {
		t.Fatal(err)
	}
	wantText := strings.Join(words[:first], " ") + " "
	if first == 0 {
		wantText = ""
	}
	got := []any{msg.StopReason, msg.StopSequence, msg.Content[0].Text, msg.Usage.OutputTokens}
	want := []any{anthropic.StopReasonStopSequence, stopWord, wantText, int64(first)}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("stopped message (-want +got):\n%s", diff)
	}
}

func TestCacheDirectives(t *testing.T) {
	fake, srv := newFake(t, fakeanthropic.Config{})
	client := newClient(srv)
	msg, err := client.Messages.New(ctxWithTimeout(t), userParams("hi [[cache_write=1000]] [[cache_read=5000]]", 50))
	if err != nil {
		t.Fatal(err)
	}
	body := rawBody("hi [[cache_write=1000]] [[cache_read=5000]]", 50, false)
	counted, err := fakeanthropic.CountTokens([]byte(body))
	if err != nil {
		t.Fatal(err)
	}
	got := []int64{msg.Usage.InputTokens, msg.Usage.CacheCreationInputTokens, msg.Usage.CacheReadInputTokens}
	// The SDK sends the text as a block, the raw body as a string: same count.
	want := []int64{int64(counted), 1000, 5000}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("usage input, cache write, cache read (-want +got):\n%s", diff)
	}
	// ITPM counts input tokens and cache writes, not cache reads.
	if got, want := fake.Stats().AdmittedInputTokens["claude"], int64(counted+1000); got != want {
		t.Errorf("admitted input tokens %d: want %d", got, want)
	}
}

// TestWireFormat checks the exact JSON and SSE shapes, key by key, that the
// Anthropic API sends.
func TestWireFormat(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{})

	t.Run("message", func(t *testing.T) {
		res, b := post(t, srv, "/v1/messages", rawBody("hi [[reply_tokens=2]]", 10, false), nil)
		if res.StatusCode != http.StatusOK || res.Header.Get("Content-Type") != "application/json" {
			t.Fatalf("status %d, content-type %q: %s", res.StatusCode, res.Header.Get("Content-Type"), b)
		}
		var m map[string]json.RawMessage
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff([]string{"content", "id", "model", "role", "stop_reason", "stop_sequence", "type", "usage"}, slices.Sorted(maps.Keys(m))); diff != "" {
			t.Errorf("message keys (-want +got):\n%s", diff)
		}
		var usage map[string]any
		_ = json.Unmarshal(m["usage"], &usage)
		if diff := cmp.Diff(map[string]any{"input_tokens": 18.0, "output_tokens": 2.0,
			"cache_creation_input_tokens": 0.0, "cache_read_input_tokens": 0.0,
			"cache_creation": map[string]any{"ephemeral_5m_input_tokens": 0.0, "ephemeral_1h_input_tokens": 0.0}}, usage); diff != "" {
			t.Errorf("usage (-want +got):\n%s", diff)
		}
		for key, want := range map[string]string{"type": `"message"`, "role": `"assistant"`, "stop_reason": `"end_turn"`,
			"stop_sequence": "null", "model": `"` + testModel + `"`} {
			if got := string(m[key]); got != want {
				t.Errorf("%s = %s, want %s", key, got, want)
			}
		}
	})

	t.Run("stream", func(t *testing.T) {
		res, b := post(t, srv, "/v1/messages", rawBody("hi [[reply_tokens=3]]", 10, true), nil)
		if res.StatusCode != http.StatusOK || res.Header.Get("Content-Type") != "text/event-stream" {
			t.Fatalf("status %d, content-type %q", res.StatusCode, res.Header.Get("Content-Type"))
		}
		events := readEvents(t, b)
		want := []string{"message_start", "ping", "content_block_start", "content_block_delta",
			"content_block_delta", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}
		if diff := cmp.Diff(want, eventNames(events)); diff != "" {
			t.Fatalf("events (-want +got):\n%s", diff)
		}
		for _, ev := range events {
			var typed struct{ Type string }
			if err := json.Unmarshal([]byte(ev.data), &typed); err != nil || typed.Type != ev.name {
				t.Errorf("event %s: data type %q (%v): want the event name", ev.name, typed.Type, err)
			}
		}
		var start struct {
			Message struct {
				Content    []any
				StopReason *string `json:"stop_reason"`
				Usage      map[string]int
			}
		}
		_ = json.Unmarshal([]byte(events[0].data), &start)
		if len(start.Message.Content) != 0 || start.Message.StopReason != nil ||
			start.Message.Usage["output_tokens"] != 1 || start.Message.Usage["input_tokens"] != 18 {
			t.Errorf("message_start %s: want empty content, null stop_reason, usage input 18 output 1", events[0].data)
		}
		var delta struct {
			Index int
			Delta struct{ Type, Text string }
		}
		_ = json.Unmarshal([]byte(events[3].data), &delta)
		if delta.Index != 0 || delta.Delta.Type != "text_delta" || len(strings.Fields(delta.Delta.Text)) != 1 {
			t.Errorf("content_block_delta %s: want index 0, one word of text_delta", events[3].data)
		}
		var md struct {
			Delta struct {
				StopReason   string  `json:"stop_reason"`
				StopSequence *string `json:"stop_sequence"`
			}
			Usage map[string]int
		}
		_ = json.Unmarshal([]byte(events[7].data), &md)
		if md.Delta.StopReason != "end_turn" || md.Delta.StopSequence != nil || md.Usage["output_tokens"] != 3 || md.Usage["input_tokens"] != 18 {
			t.Errorf("message_delta %s: want end_turn, null stop_sequence, cumulative usage", events[7].data)
		}
	})
}

func TestAuth(t *testing.T) {
	tests := []struct {
		name       string
		keys       []string
		hdr        map[string]string
		wantStatus int
		wantMsg    string
	}{
		{"x-api-key", []string{testKey}, nil, 200, ""},
		{"bearer", []string{testKey}, map[string]string{"x-api-key": "", "Authorization": "Bearer " + testKey}, 200, ""},
		{"missing", []string{testKey}, map[string]string{"x-api-key": ""}, 401, "x-api-key header is required"},
		{"wrong x-api-key", []string{testKey}, map[string]string{"x-api-key": "sk-other"}, 401, "invalid x-api-key"},
		{"wrong bearer", []string{testKey}, map[string]string{"x-api-key": "", "Authorization": "Bearer sk-other"}, 401, "invalid x-api-key"},
		{"second key", []string{"sk-a", testKey}, nil, 200, ""},
		{"any key when none configured", nil, map[string]string{"x-api-key": "whatever"}, 200, ""},
		{"empty bearer when none configured", nil, map[string]string{"x-api-key": "", "Authorization": "Bearer "}, 401, "x-api-key header is required"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, srv := newFake(t, fakeanthropic.Config{APIKeys: tt.keys})
			res, b := post(t, srv, "/v1/messages", rawBody("hi", 10, false), tt.hdr)
			if res.StatusCode != tt.wantStatus {
				t.Fatalf("status %d: want %d (%s)", res.StatusCode, tt.wantStatus, b)
			}
			if tt.wantStatus == 200 {
				return
			}
			e := decodeError(t, res, b)
			if e.Error.Type != "authentication_error" || e.Error.Message != tt.wantMsg {
				t.Errorf("error %+v: want authentication_error %q", e.Error, tt.wantMsg)
			}
		})
	}

	t.Run("SDK with wrong key", func(t *testing.T) {
		_, srv := newFake(t, fakeanthropic.Config{APIKeys: []string{"sk-only"}})
		client := newClient(srv)
		_, err := client.Messages.New(ctxWithTimeout(t), userParams("hi", 10))
		var apiErr *anthropic.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != 401 || apiErr.Type() != "authentication_error" {
			t.Fatalf("error %v: want *anthropic.Error 401 authentication_error", err)
		}
	})
}

func TestInvalidRequests(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{})
	big := `{"model":"` + testModel + `","max_tokens":10,"messages":[{"role":"user","content":"` +
		strings.Repeat("a", 32<<20) + `"}]}`
	tests := []struct {
		name       string
		path       string
		body       string
		hdr        map[string]string
		wantStatus int
		wantType   string
		wantMsg    string
	}{
		{"not JSON", "/v1/messages", `{`, nil, 400, "invalid_request_error", ""},
		{"JSON array", "/v1/messages", `[]`, nil, 400, "invalid_request_error", ""},
		{"no model", "/v1/messages", `{"max_tokens":1,"messages":[{"role":"user","content":"x"}]}`, nil, 400, "invalid_request_error", "model: Field required"},
		{"model not a string", "/v1/messages", `{"model":3,"max_tokens":1,"messages":[{"role":"user","content":"x"}]}`, nil, 400, "invalid_request_error", "model: Input should be a valid string"},
		{"no max_tokens", "/v1/messages", `{"model":"claude-x","messages":[{"role":"user","content":"x"}]}`, nil, 400, "invalid_request_error", "max_tokens: Field required"},
		{"max_tokens zero", "/v1/messages", `{"model":"claude-x","max_tokens":0,"messages":[{"role":"user","content":"x"}]}`, nil, 400, "invalid_request_error", "max_tokens: Input should be greater than or equal to 1"},
		{"max_tokens fraction", "/v1/messages", `{"model":"claude-x","max_tokens":1.5,"messages":[{"role":"user","content":"x"}]}`, nil, 400, "invalid_request_error", "max_tokens: Input should be a valid integer"},
		{"max_tokens string", "/v1/messages", `{"model":"claude-x","max_tokens":"5","messages":[{"role":"user","content":"x"}]}`, nil, 400, "invalid_request_error", "max_tokens: Input should be a valid integer"},
		{"no messages", "/v1/messages", `{"model":"claude-x","max_tokens":1}`, nil, 400, "invalid_request_error", "messages: Field required"},
		{"empty messages", "/v1/messages", `{"model":"claude-x","max_tokens":1,"messages":[]}`, nil, 400, "invalid_request_error", "messages: at least one message is required"},
		{"messages not a list", "/v1/messages", `{"model":"claude-x","max_tokens":1,"messages":{}}`, nil, 400, "invalid_request_error", "messages: Input should be a valid list"},
		{"bad role", "/v1/messages", `{"model":"claude-x","max_tokens":1,"messages":[{"role":"system","content":"x"}]}`, nil, 400, "invalid_request_error", "messages.0.role: Input should be 'user' or 'assistant'"},
		{"no content", "/v1/messages", `{"model":"claude-x","max_tokens":1,"messages":[{"role":"user"}]}`, nil, 400, "invalid_request_error", "messages.0.content: Field required"},
		{"content a number", "/v1/messages", `{"model":"claude-x","max_tokens":1,"messages":[{"role":"user","content":1}]}`, nil, 400, "invalid_request_error", "messages.0.content: Input should be a valid string or a list of content blocks"},
		{"block without type", "/v1/messages", `{"model":"claude-x","max_tokens":1,"messages":[{"role":"user","content":[{"text":"x"}]}]}`, nil, 400, "invalid_request_error", "messages.0.content.0.type: Field required"},
		{"text block without text", "/v1/messages", `{"model":"claude-x","max_tokens":1,"messages":[{"role":"user","content":"x"},{"role":"assistant","content":[{"type":"text"}]}]}`, nil, 400, "invalid_request_error", "messages.1.content.0.text: Field required"},
		{"system a number", "/v1/messages", `{"model":"claude-x","max_tokens":1,"system":1,"messages":[{"role":"user","content":"x"}]}`, nil, 400, "invalid_request_error", "system: Input should be a valid string or a list of text blocks"},
		{"system image block", "/v1/messages", `{"model":"claude-x","max_tokens":1,"system":[{"type":"image"}],"messages":[{"role":"user","content":"x"}]}`, nil, 400, "invalid_request_error", "system.0.type: Input should be 'text'"},
		{"stream not bool", "/v1/messages", `{"model":"claude-x","max_tokens":1,"stream":"yes","messages":[{"role":"user","content":"x"}]}`, nil, 400, "invalid_request_error", "stream: Input should be a valid boolean"},
		{"user_id not string", "/v1/messages", `{"model":"claude-x","max_tokens":1,"metadata":{"user_id":1},"messages":[{"role":"user","content":"x"}]}`, nil, 400, "invalid_request_error", "metadata.user_id: Input should be a valid string"},
		{"no anthropic-version", "/v1/messages", rawBody("x", 1, false), map[string]string{"anthropic-version": ""}, 400, "invalid_request_error", "anthropic-version: header is required"},
		{"unknown model", "/v1/messages", `{"model":"gpt-4","max_tokens":1,"messages":[{"role":"user","content":"x"}]}`, nil, 404, "not_found_error", "model: gpt-4"},
		{"unknown route", "/v1/complete", `{}`, nil, 404, "not_found_error", ""},
		{"count_tokens unknown model", "/v1/messages/count_tokens", `{"model":"gpt-4","messages":[{"role":"user","content":"x"}]}`, nil, 404, "not_found_error", "model: gpt-4"},
		{"count_tokens no messages", "/v1/messages/count_tokens", `{"model":"claude-x"}`, nil, 400, "invalid_request_error", "messages: Field required"},
		{"too large", "/v1/messages", big, nil, 413, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, b := post(t, srv, tt.path, tt.body, tt.hdr)
			if res.StatusCode != tt.wantStatus {
				t.Fatalf("status %d: want %d (%.200s)", res.StatusCode, tt.wantStatus, b)
			}
			if !strings.HasPrefix(res.Header.Get("request-id"), "req_") {
				t.Errorf("request-id %q: want req_…", res.Header.Get("request-id"))
			}
			if tt.wantStatus == 413 {
				want := `{"error":{"message":"Request exceeds the maximum size","type":"request_too_large"}}`
				if string(b) != want {
					t.Errorf("413 body %s: want the CDN's %s", b, want)
				}
				return
			}
			e := decodeError(t, res, b)
			if e.Error.Type != tt.wantType || (tt.wantMsg != "" && e.Error.Message != tt.wantMsg) {
				t.Errorf("error %s %q: want %s %q", e.Error.Type, e.Error.Message, tt.wantType, tt.wantMsg)
			}
		})
	}
}

func TestGetOnMessagesIsNotFound(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{})
	res, err := srv.Client().Get(srv.URL + "/v1/messages")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusNotFound {
		t.Errorf("GET /v1/messages: status %d, want 404", res.StatusCode)
	}
}

func TestUserIDIsLogged(t *testing.T) {
	fake, srv := newFake(t, fakeanthropic.Config{})
	params := userParams("hi", 10)
	params.Metadata.UserID = anthropic.String("user-42")
	client := newClient(srv)
	if _, err := client.Messages.New(ctxWithTimeout(t), params); err != nil {
		t.Fatal(err)
	}
	log := fake.Stats().Log
	if len(log) != 1 || log[0].UserID != "user-42" {
		t.Errorf("log %+v: want one record with user_id user-42", log)
	}
}
