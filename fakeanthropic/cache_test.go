package fakeanthropic_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/google/go-cmp/cmp"

	"github.com/sluice-dev/sluice/fakeanthropic"
)

// cacheUsage is the input side of a usage, as the tests compare it.
type cacheUsage struct {
	Input, Creation, Read  int
	Creation5m, Creation1h int
}

// wireUsage is a usage object off the wire.
type wireUsage struct {
	InputTokens              int `json:"input_tokens"`
	CacheCreationInputTokens int `json:"cache_creation_input_tokens"`
	CacheReadInputTokens     int `json:"cache_read_input_tokens"`
	OutputTokens             int `json:"output_tokens"`
	CacheCreation            *struct {
		Ephemeral5m int `json:"ephemeral_5m_input_tokens"`
		Ephemeral1h int `json:"ephemeral_1h_input_tokens"`
	} `json:"cache_creation"`
}

func (u wireUsage) cache(t testing.TB) cacheUsage {
	t.Helper()
	if u.CacheCreation == nil {
		t.Fatalf("usage %+v has no cache_creation breakdown", u)
	}
	return cacheUsage{u.InputTokens, u.CacheCreationInputTokens, u.CacheReadInputTokens,
		u.CacheCreation.Ephemeral5m, u.CacheCreation.Ephemeral1h}
}

// text is a text of exactly tokens tokens (4 bytes each), different for
// each seed.
func text(seed string, tokens int) string {
	s := strings.Repeat(seed+"-", tokens*4/(len(seed)+1)+1)
	return s[:tokens*4]
}

var ephemeral = map[string]any{"type": "ephemeral"}

// cachedBody is a Messages body from its parts (nil parts are left out).
func cachedBody(tools, system, messages any, stream bool) string {
	m := map[string]any{"model": testModel, "max_tokens": 10, "stream": stream, "messages": messages}
	if tools != nil {
		m["tools"] = tools
	}
	if system != nil {
		m["system"] = system
	}
	b, _ := json.Marshal(m)
	return string(b)
}

// prefixTokens counts a body cut right after a breakpoint: its prefix.
func prefixTokens(t testing.TB, tools, system, messages any) int {
	t.Helper()
	n, err := fakeanthropic.CountTokens([]byte(cachedBody(tools, system, messages, false)))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// sendJSON posts body and returns the usage of its JSON answer.
func sendJSON(t testing.TB, srv *httptest.Server, body string) wireUsage {
	t.Helper()
	res, b := post(t, srv, "/v1/messages", body, nil)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", res.StatusCode, b)
	}
	var msg struct{ Usage wireUsage }
	if err := json.Unmarshal(b, &msg); err != nil {
		t.Fatal(err)
	}
	return msg.Usage
}

// sendStream posts body with stream true and returns the usage of its
// message_start and of its message_delta.
func sendStream(t testing.TB, srv *httptest.Server, body string) (start, delta wireUsage) {
	t.Helper()
	res, b := post(t, srv, "/v1/messages", body, nil)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", res.StatusCode, b)
	}
	for _, ev := range readEvents(t, []byte(b)) {
		switch ev.name {
		case "message_start":
			var v struct{ Message struct{ Usage wireUsage } }
			_ = json.Unmarshal([]byte(ev.data), &v)
			start = v.Message.Usage
		case "message_delta":
			var v struct{ Usage wireUsage }
			_ = json.Unmarshal([]byte(ev.data), &v)
			delta = v.Usage
		}
	}
	return start, delta
}

func TestCacheBreakpointPlaces(t *testing.T) {
	tool := func(cc any) map[string]any {
		m := map[string]any{"name": "lookup", "description": text("tool", 1500), "input_schema": map[string]any{"type": "object"}}
		if cc != nil {
			m["cache_control"] = cc
		}
		return m
	}
	sys := func(cc any) []map[string]any {
		m := map[string]any{"type": "text", "text": text("system", 1200)}
		if cc != nil {
			m["cache_control"] = cc
		}
		return []map[string]any{m}
	}
	user := func(cc any, tail string) []map[string]any {
		first := map[string]any{"type": "text", "text": text("document", 1100)}
		if cc != nil {
			first["cache_control"] = cc
		}
		return []map[string]any{{"role": "user", "content": []any{first, map[string]any{"type": "text", "text": tail}}}}
	}
	userPrefix := func() []map[string]any {
		return []map[string]any{{"role": "user", "content": []any{map[string]any{"type": "text", "text": text("document", 1100)}}}}
	}
	tests := []struct {
		name          string
		tools, system any
		messages      func(tail string) any
		prefix        int // tokens of the cached prefix
		oneHour       bool
	}{
		{"tools", []any{tool(ephemeral)}, nil, func(tail string) any { return user(nil, tail) },
			prefixTokens(t, []any{tool(nil)}, nil, nil), false},
		{"system", []any{tool(nil)}, sys(ephemeral), func(tail string) any { return user(nil, tail) },
			prefixTokens(t, []any{tool(nil)}, sys(nil), nil), false},
		{"message block, 1h", nil, sys(nil), func(tail string) any { return user(map[string]any{"type": "ephemeral", "ttl": "1h"}, tail) },
			prefixTokens(t, nil, sys(nil), userPrefix()), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, srv := newFake(t, fakeanthropic.Config{Clock: newTestClock().Now,
				Groups: oneGroup(1000, 1_000_000, 100_000)})
			first := cachedBody(tt.tools, tt.system, tt.messages("question one [[reply_tokens=2]]"), false)
			total, err := fakeanthropic.CountTokens([]byte(first))
			if err != nil {
				t.Fatal(err)
			}
			if tt.prefix < 1024 || tt.prefix >= total {
				t.Fatalf("prefix %d of %d: the test needs a cacheable prefix", tt.prefix, total)
			}
			write := cacheUsage{Input: total - tt.prefix, Creation: tt.prefix, Creation5m: tt.prefix}
			read := cacheUsage{Input: total - tt.prefix, Read: tt.prefix}
			if tt.oneHour {
				write.Creation5m, write.Creation1h = 0, tt.prefix
			}
			if diff := cmp.Diff(write, sendJSON(t, srv, first).cache(t)); diff != "" {
				t.Errorf("first call (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(read, sendJSON(t, srv, first).cache(t)); diff != "" {
				t.Errorf("same call again (-want +got):\n%s", diff)
			}
			// What follows the breakpoint does not matter; streaming shows the
			// same usage in message_start and message_delta.
			second := cachedBody(tt.tools, tt.system, tt.messages("question two, longer [[reply_tokens=3]]"), true)
			total2, _ := fakeanthropic.CountTokens([]byte(second))
			start, delta := sendStream(t, srv, second)
			want2 := cacheUsage{Input: total2 - tt.prefix, Read: tt.prefix}
			if diff := cmp.Diff(want2, start.cache(t)); diff != "" {
				t.Errorf("message_start of another question (-want +got):\n%s", diff)
			}
			if start.OutputTokens != 1 || delta.OutputTokens != 3 || delta.CacheCreation != nil ||
				delta.InputTokens != want2.Input || delta.CacheReadInputTokens != want2.Read || delta.CacheCreationInputTokens != 0 {
				t.Errorf("message_start usage %+v, message_delta usage %+v: want output 1 then 3, the same input side, no breakdown in the delta", start, delta)
			}
		})
	}
}

func TestCacheMinimumPrefix(t *testing.T) {
	const haiku = "claude-haiku-4-5"
	tests := []struct {
		name   string
		model  string
		tokens int // of the whole prefix, framing and the message included
		group  int // Group.CacheMinTokens
		cached bool
	}{
		{"sonnet below 1,024", testModel, 1023, 0, false},
		{"sonnet at 1,024", testModel, 1024, 0, true},
		{"haiku below 2,048", haiku, 2047, 0, false},
		{"haiku at 2,048", haiku, 2048, 0, true},
		{"configured minimum", testModel, 100, 100, true},
		{"configured minimum, below", testModel, 99, 100, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := oneGroup(1000, 1_000_000, 100_000)
			g[0].CacheMinTokens = tt.group
			fake, srv := newFake(t, fakeanthropic.Config{Groups: g})
			// 8 framing + 4 for the message + the block.
			body := `{"model":"` + tt.model + `","max_tokens":5,"messages":[{"role":"user","content":[{"type":"text","text":"` +
				text("x", tt.tokens-12) + `","cache_control":{"type":"ephemeral"}},{"type":"text","text":"go"}]}]}`
			for i := range 2 {
				res, b := post(t, srv, "/v1/messages", body, nil)
				var msg struct{ Usage wireUsage }
				if err := json.Unmarshal(b, &msg); err != nil || res.StatusCode != 200 {
					t.Fatalf("call %d: status %d: %s", i, res.StatusCode, b)
				}
				u := msg.Usage.cache(t)
				want := cacheUsage{Input: tt.tokens + 1} // "go": 1 token
				if tt.cached && i == 0 {
					want = cacheUsage{Input: 1, Creation: tt.tokens, Creation5m: tt.tokens}
				} else if tt.cached {
					want = cacheUsage{Input: 1, Read: tt.tokens}
				}
				if diff := cmp.Diff(want, u); diff != "" {
					t.Errorf("call %d (-want +got):\n%s", i, diff)
				}
			}
			if got, want := fake.Stats().CacheEntries, map[bool]int64{true: 1, false: 0}[tt.cached]; got != want {
				t.Errorf("cache entries %d, want %d", got, want)
			}
		})
	}
}

func TestCacheControlValidation(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{})
	block := func(cc string) string {
		return `{"type":"text","text":"abc","cache_control":` + cc + `}`
	}
	body := func(system string, blocks ...string) string {
		return `{"model":"` + testModel + `","max_tokens":5,"system":[` + system + `],"messages":[{"role":"user","content":[` +
			strings.Join(blocks, ",") + `]}]}`
	}
	ok := block(`{"type":"ephemeral"}`)
	tests := []struct {
		name       string
		body       string
		wantStatus int
		wantMsg    string
	}{
		{"four breakpoints", body(ok, ok, ok, ok), 200, ""},
		{"five breakpoints", body(ok, ok, ok, ok, ok), 400, "A maximum of 4 blocks with cache_control may be provided. Found 5."},
		{"five with a tool", `{"model":"` + testModel + `","max_tokens":5,"tools":[{"name":"t","input_schema":{},"cache_control":{"type":"ephemeral"}}],` +
			body(ok, ok, ok, ok)[len(`{"model":"`+testModel+`","max_tokens":5,`):], 400, "A maximum of 4 blocks with cache_control may be provided. Found 5."},
		{"null is no breakpoint", body(ok, ok, ok, ok, block(`null`)), 200, ""},
		{"1h ttl", body(block(`{"type":"ephemeral","ttl":"1h"}`), ok), 200, ""},
		{"unknown type", body(ok, block(`{"type":"forever"}`)), 400, "messages.0.content.0.cache_control.type: Input should be 'ephemeral'"},
		{"no type", body(block(`{}`), ok), 400, "system.0.cache_control.type: Field required"},
		{"unknown ttl", body(ok, block(`{"type":"ephemeral","ttl":"2h"}`)), 400, "messages.0.content.0.cache_control.ttl: Input should be '5m' or '1h'"},
		{"not an object", body(ok, block(`"ephemeral"`)), 400, "messages.0.content.0.cache_control: Input should be a valid dictionary"},
		{"tools not a list", `{"model":"` + testModel + `","max_tokens":5,"tools":{},"messages":[{"role":"user","content":"x"}]}`, 400, "tools: Input should be a valid list"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, b := post(t, srv, "/v1/messages", tt.body, nil)
			if res.StatusCode != tt.wantStatus {
				t.Fatalf("status %d: want %d (%s)", res.StatusCode, tt.wantStatus, b)
			}
			if tt.wantStatus == 200 {
				return
			}
			if e := decodeError(t, res, b); e.Error.Type != "invalid_request_error" || e.Error.Message != tt.wantMsg {
				t.Errorf("error %s %q: want invalid_request_error %q", e.Error.Type, e.Error.Message, tt.wantMsg)
			}
		})
	}

	// count_tokens ignores caching: the same total, breakpoints or not.
	res, b := post(t, srv, "/v1/messages/count_tokens", body(ok, ok, block(`{"type":"ephemeral","ttl":"1h"}`)), nil)
	want, _ := fakeanthropic.CountTokens([]byte(body(ok, ok, ok)))
	var got struct {
		InputTokens int `json:"input_tokens"`
	}
	if err := json.Unmarshal(b, &got); err != nil || res.StatusCode != 200 || got.InputTokens != want {
		t.Errorf("count_tokens: %d %s, want input_tokens %d", res.StatusCode, b, want)
	}
}

// sdkParams is an SDK request whose system prompt is cached; tail is the
// question after the breakpoint.
func sdkParams(system, tail string) anthropic.MessageNewParams {
	return anthropic.MessageNewParams{
		Model:     testModel,
		MaxTokens: 50,
		System:    []anthropic.TextBlockParam{{Text: system, CacheControl: anthropic.NewCacheControlEphemeralParam()}},
		Messages:  []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock(tail))},
	}
}

func sdkUsage(u anthropic.Usage) cacheUsage {
	return cacheUsage{int(u.InputTokens), int(u.CacheCreationInputTokens), int(u.CacheReadInputTokens),
		int(u.CacheCreation.Ephemeral5mInputTokens), int(u.CacheCreation.Ephemeral1hInputTokens)}
}

func TestCacheWithSDK(t *testing.T) {
	fake, srv := newFake(t, fakeanthropic.Config{Groups: oneGroup(1000, 1_000_000, 100_000)})
	client := newClient(srv)
	system := text("you are a careful assistant", 2000)
	prefix := 8 + 2000 // framing + the system prompt
	tail := "What now? [[reply_tokens=4]]"
	rest := 4 + (len(tail)+3)/4 // the message after the breakpoint

	call := func(system, tail string) cacheUsage {
		t.Helper()
		msg, err := client.Messages.New(ctxWithTimeout(t), sdkParams(system, tail))
		if err != nil {
			t.Fatal(err)
		}
		return sdkUsage(msg.Usage)
	}
	created := cacheUsage{Input: rest, Creation: prefix, Creation5m: prefix}
	read := cacheUsage{Input: rest, Read: prefix}
	if diff := cmp.Diff(created, call(system, tail)); diff != "" {
		t.Errorf("cold cache (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(read, call(system, tail)); diff != "" {
		t.Errorf("the same request again (-want +got):\n%s", diff)
	}
	// One character changed in the prefix: a new entry.
	changed := system[:1000] + "!" + system[1001:]
	if diff := cmp.Diff(created, call(changed, tail)); diff != "" {
		t.Errorf("one character changed (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(read, call(changed, tail)); diff != "" {
		t.Errorf("the changed prefix again (-want +got):\n%s", diff)
	}

	// Streaming through the SDK: the accumulated usage reads too.
	stream := client.Messages.NewStreaming(ctxWithTimeout(t), sdkParams(system, tail))
	var acc anthropic.Message
	for stream.Next() {
		if err := acc.Accumulate(stream.Current()); err != nil {
			t.Fatal(err)
		}
	}
	if err := stream.Err(); err != nil {
		t.Fatal(err)
	}
	stream.Close()
	if got := sdkUsage(acc.Usage); got.Read != prefix || got.Creation != 0 || got.Input != rest || acc.Usage.OutputTokens != 4 {
		t.Errorf("streamed usage %+v (output %d): want a read of %d, input %d, output 4", got, acc.Usage.OutputTokens, prefix, rest)
	}

	// The log tells creating calls from reading ones.
	var creations, reads []int
	for _, rec := range fake.Stats().Log {
		creations = append(creations, rec.CacheCreationInputTokens)
		reads = append(reads, rec.CacheReadInputTokens)
	}
	if diff := cmp.Diff([]int{prefix, 0, prefix, 0, 0}, creations); diff != "" {
		t.Errorf("log cache_creation_input_tokens (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]int{0, prefix, 0, prefix, prefix}, reads); diff != "" {
		t.Errorf("log cache_read_input_tokens (-want +got):\n%s", diff)
	}
	st := fake.Stats()
	if st.AdmittedCacheCreationTokens["claude"] != int64(2*prefix) || st.AdmittedCacheReadTokens["claude"] != int64(3*prefix) || st.CacheEntries != 2 {
		t.Errorf("stats: creation %d, read %d, entries %d: want %d, %d, 2", st.AdmittedCacheCreationTokens["claude"],
			st.AdmittedCacheReadTokens["claude"], st.CacheEntries, 2*prefix, 3*prefix)
	}
}

func TestCacheSeveralBreakpoints(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{Groups: oneGroup(1000, 1_000_000, 100_000)})
	tools := []any{map[string]any{"name": "t", "description": text("tool", 1100), "input_schema": map[string]any{},
		"cache_control": map[string]any{"type": "ephemeral", "ttl": "1h"}}}
	sys := func(words string) []any {
		return []any{map[string]any{"type": "text", "text": text(words, 500), "cache_control": ephemeral}}
	}
	msgs := []any{map[string]any{"role": "user", "content": "hi"}}
	toolPrefix := prefixTokens(t, []any{map[string]any{"name": "t", "description": text("tool", 1100), "input_schema": map[string]any{}}}, nil, nil)
	sysPrefix := toolPrefix + 500
	total := sysPrefix + 4 + 1

	want := cacheUsage{Input: 5, Creation: sysPrefix, Creation1h: toolPrefix, Creation5m: 500}
	if diff := cmp.Diff(want, sendJSON(t, srv, cachedBody(tools, sys("alpha"), msgs, false)).cache(t)); diff != "" {
		t.Errorf("cold: both written, by ttl (-want +got):\n%s", diff)
	}
	// Another system prompt: the tools are read, the system written.
	want = cacheUsage{Input: 5, Read: toolPrefix, Creation: 500, Creation5m: 500}
	if diff := cmp.Diff(want, sendJSON(t, srv, cachedBody(tools, sys("omega"), msgs, false)).cache(t)); diff != "" {
		t.Errorf("system changed (-want +got):\n%s", diff)
	}
	// The first again: the longest cached prefix is read.
	want = cacheUsage{Input: total - sysPrefix, Read: sysPrefix}
	if diff := cmp.Diff(want, sendJSON(t, srv, cachedBody(tools, sys("alpha"), msgs, false)).cache(t)); diff != "" {
		t.Errorf("first again (-want +got):\n%s", diff)
	}
	// Another model has its own cache.
	other := strings.Replace(cachedBody(tools, sys("alpha"), msgs, false), testModel, "claude-opus-4-5", 1)
	want = cacheUsage{Input: 5, Creation: sysPrefix, Creation1h: toolPrefix, Creation5m: 500}
	if diff := cmp.Diff(want, sendJSON(t, srv, other).cache(t)); diff != "" {
		t.Errorf("another model (-want +got):\n%s", diff)
	}
}

func TestCacheTTL(t *testing.T) {
	clk := newTestClock()
	fake, srv := newFake(t, fakeanthropic.Config{Groups: oneGroup(1000, 1_000_000, 100_000), Clock: clk.Now})
	body := func(ttl string) string {
		cc := map[string]any{"type": "ephemeral"}
		if ttl != "" {
			cc["ttl"] = ttl
		}
		words := "five minutes"
		if ttl == "1h" {
			words = "one hour"
		}
		return cachedBody(nil, []any{map[string]any{"type": "text", "text": text(words, 1100), "cache_control": cc}},
			[]any{map[string]any{"role": "user", "content": "hi"}}, false)
	}
	reads := func(b string) bool {
		u := sendJSON(t, srv, b)
		return u.CacheReadInputTokens > 0 && u.CacheCreationInputTokens == 0
	}
	const step = 5*time.Minute - time.Second

	var got []bool
	got = append(got, reads(body(""))) // written
	clk.Advance(step)
	got = append(got, reads(body(""))) // read just in time, lifetime refreshed
	clk.Advance(step)
	got = append(got, reads(body(""))) // alive thanks to the refresh
	clk.Advance(5 * time.Minute)
	got = append(got, reads(body("")))   // expired: written again
	got = append(got, reads(body("5m"))) // "5m" is the default: the same entry
	if diff := cmp.Diff([]bool{false, true, true, false, true}, got); diff != "" {
		t.Errorf("5-minute entry, reads (-want +got):\n%s", diff)
	}

	got = nil
	got = append(got, reads(body("1h")))
	clk.Advance(50 * time.Minute)
	got = append(got, reads(body("1h")))
	clk.Advance(time.Hour + time.Second)
	got = append(got, reads(body("1h")))
	if diff := cmp.Diff([]bool{false, true, false}, got); diff != "" {
		t.Errorf("1-hour entry, reads (-want +got):\n%s", diff)
	}
	if n := fake.Stats().CacheEntries; n != 1 {
		t.Errorf("%d live entries, want 1 (the 5-minute one has expired)", n)
	}
}

func TestCacheChargesITPM(t *testing.T) {
	// A 2,000-token cached prefix and a 3,000 ITPM bucket.
	sys := []any{map[string]any{"type": "text", "text": text("policy", 2000-8), "cache_control": ephemeral}}
	msgs := []any{map[string]any{"role": "user", "content": text("q", 40)}}
	body := cachedBody(nil, sys, msgs, false)
	const prefix, rest = 2000, 44
	for _, countReads := range []bool{false, true} {
		t.Run(map[bool]string{false: "current rule", true: "legacy: reads count"}[countReads], func(t *testing.T) {
			g := oneGroup(1000, 3_000, 100_000)
			g[0].CountCacheReads = countReads
			fake, srv := newFake(t, fakeanthropic.Config{Groups: g, Clock: newTestClock().Now})

			res, b := post(t, srv, "/v1/messages", body, nil)
			if res.StatusCode != 200 {
				t.Fatalf("first call: %d %s", res.StatusCode, b)
			}
			// Written: input + creation = the whole prompt; 956 left.
			if got := fake.Stats().AdmittedInputTokens["claude"]; got != prefix+rest {
				t.Errorf("first call charged %d, want %d", got, prefix+rest)
			}
			res, b = post(t, srv, "/v1/messages", body, nil)
			if !countReads {
				// Read: only the 44 uncached tokens count.
				if res.StatusCode != 200 {
					t.Fatalf("second call: %d %s, want 200 (cache reads are free)", res.StatusCode, b)
				}
				if got := fake.Stats().AdmittedInputTokens["claude"]; got != prefix+2*rest {
					t.Errorf("after the read, charged %d, want %d", got, prefix+2*rest)
				}
				var msg struct{ Usage wireUsage }
				_ = json.Unmarshal(b, &msg)
				if msg.Usage.CacheReadInputTokens != prefix || msg.Usage.InputTokens != rest {
					t.Errorf("usage %+v: want a read of %d and %d input tokens", msg.Usage, prefix, rest)
				}
				return
			}
			// Reads count: 2,044 do not fit in 956.
			if res.StatusCode != 429 {
				t.Fatalf("second call: %d %s, want 429 (cache reads count)", res.StatusCode, b)
			}
			if e := decodeError(t, res, b); !strings.Contains(e.Error.Message, "3,000 input tokens") {
				t.Errorf("429 %q: want it to name the input-token limit", e.Error.Message)
			}
			if rec := fake.Stats().Log[1]; rec.InputTokens != prefix+rest || rec.CacheReadInputTokens != 0 {
				t.Errorf("refused record %+v: want %d charged and no cache usage", rec, prefix+rest)
			}
		})
	}
}

func TestClearCache(t *testing.T) {
	fake, srv := newFake(t, fakeanthropic.Config{Groups: oneGroup(1000, 1_000_000, 100_000)})
	body := cachedBody(nil, []any{map[string]any{"type": "text", "text": text("clear", 1100), "cache_control": ephemeral}},
		[]any{map[string]any{"role": "user", "content": "hi"}}, false)
	sendJSON(t, srv, body)
	if u := sendJSON(t, srv, body); u.CacheReadInputTokens == 0 {
		t.Fatalf("usage %+v: want a read before the clear", u)
	}
	res, b := post(t, srv, "/_fake/cache/clear", "", nil)
	if res.StatusCode != 200 || string(b) != `{"cleared":1}` {
		t.Fatalf("POST /_fake/cache/clear: %d %s, want 200 {\"cleared\":1}", res.StatusCode, b)
	}
	if u := sendJSON(t, srv, body); u.CacheCreationInputTokens == 0 || u.CacheReadInputTokens != 0 {
		t.Errorf("usage %+v: want a write after the clear", u)
	}
	if n := fake.ClearCache(); n != 1 {
		t.Errorf("ClearCache = %d, want 1", n)
	}
	if n := fake.Stats().CacheEntries; n != 0 {
		t.Errorf("%d entries after ClearCache, want 0", n)
	}
}
