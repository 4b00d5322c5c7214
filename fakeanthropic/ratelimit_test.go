package fakeanthropic_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/sluice-dev/sluice/fakeanthropic"
)

// limitHeaders picks the rate-limit headers of one axis, plus retry-after
// and x-should-retry.
func limitHeaders(res *http.Response, axis string) map[string]string {
	p := "anthropic-ratelimit-" + axis + "-"
	return map[string]string{
		"status":         http.StatusText(res.StatusCode),
		"limit":          res.Header.Get(p + "limit"),
		"remaining":      res.Header.Get(p + "remaining"),
		"reset":          res.Header.Get(p + "reset"),
		"retry-after":    res.Header.Get("retry-after"),
		"x-should-retry": res.Header.Get("x-should-retry"),
	}
}

func oneGroup(rpm, itpm, otpm int) []fakeanthropic.Group {
	return []fakeanthropic.Group{{Name: "claude", Models: []string{"claude-*"}, RPM: rpm, InputTPM: itpm, OutputTPM: otpm}}
}

// promptOf returns a user text whose request counts exactly tokens input
// tokens: 8 framing + 4 for the message + ceil(bytes/4).
func promptOf(tokens int) string {
	return strings.Repeat("abcd", tokens-12)
}

func TestRequestsBucket(t *testing.T) {
	clk := newTestClock()
	_, srv := newFake(t, fakeanthropic.Config{Groups: oneGroup(3, 30_000, 8_000), Clock: clk.Now})
	body := rawBody("hi", 10, false)
	at := func(d time.Duration) string { return clk.Now().Add(d).Format(time.RFC3339) }

	var got []map[string]string
	for range 4 {
		res, _ := post(t, srv, "/v1/messages", body, nil)
		got = append(got, limitHeaders(res, "requests"))
	}
	ok := func(remaining string, reset time.Duration) map[string]string {
		return map[string]string{"status": "OK", "limit": "3", "remaining": remaining, "reset": at(reset), "retry-after": "", "x-should-retry": ""}
	}
	want := []map[string]string{
		ok("2", 20*time.Second), // one request refills in 60/3 s
		ok("1", 40*time.Second),
		ok("0", 60*time.Second),
		{"status": "Too Many Requests", "limit": "3", "remaining": "0", "reset": at(60 * time.Second), "retry-after": "20", "x-should-retry": "true"},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("headers of four requests at one instant (-want +got):\n%s", diff)
	}

	clk.Advance(19 * time.Second)
	res, b := post(t, srv, "/v1/messages", body, nil)
	if res.StatusCode != 429 || res.Header.Get("retry-after") != "1" {
		t.Fatalf("after 19 s: status %d, retry-after %q: want 429 and 1", res.StatusCode, res.Header.Get("retry-after"))
	}
	e := decodeError(t, res, b)
	if e.Error.Type != "rate_limit_error" || !strings.Contains(e.Error.Message, "of 3 requests per minute") {
		t.Errorf("error %+v: want rate_limit_error naming 3 requests per minute", e.Error)
	}

	clk.Advance(time.Second)
	if res, b := post(t, srv, "/v1/messages", body, nil); res.StatusCode != 200 {
		t.Fatalf("after 20 s: status %d (%s), want 200", res.StatusCode, b)
	}
}

func TestResetRoundsUpToWholeSeconds(t *testing.T) {
	clk := newTestClock()
	clk.Advance(500 * time.Millisecond)
	_, srv := newFake(t, fakeanthropic.Config{Groups: oneGroup(3, 30_000, 8_000), Clock: clk.Now})
	res, _ := post(t, srv, "/v1/messages", rawBody("hi", 10, false), nil)
	// 05:06:07.5 + 20 s = 05:06:27.5, rounded up.
	if got, want := res.Header.Get("anthropic-ratelimit-requests-reset"), "2026-03-04T05:06:28Z"; got != want {
		t.Errorf("reset %q, want %q", got, want)
	}
}

func TestInputTokensBucket(t *testing.T) {
	clk := newTestClock()
	_, srv := newFake(t, fakeanthropic.Config{Groups: oneGroup(1000, 30_000, 8_000), Clock: clk.Now})
	at := func(d time.Duration) string { return clk.Now().Add(d).Format(time.RFC3339) }

	tests := []struct {
		name   string
		tokens int
		want   map[string]string
	}{
		// 30,000 − 1,400 = 28,600: rounded to the nearest 1,000; full again in
		// 1,400/500 = 2.8 s, rounded up to a whole second.
		{"first", 1_400, map[string]string{"status": "OK", "limit": "30000", "remaining": "29000", "reset": at(3 * time.Second), "retry-after": "", "x-should-retry": ""}},
		{"second", 1_400, map[string]string{"status": "OK", "limit": "30000", "remaining": "27000", "reset": at(6 * time.Second), "retry-after": "", "x-should-retry": ""}},
		{"fills", 17_200, map[string]string{"status": "OK", "limit": "30000", "remaining": "10000", "reset": at(40 * time.Second), "retry-after": "", "x-should-retry": ""}},
		// 10,000 left, 20,000 needed, 500 a second.
		{"refused", 20_000, map[string]string{"status": "Too Many Requests", "limit": "30000", "remaining": "10000", "reset": at(40 * time.Second), "retry-after": "20", "x-should-retry": "true"}},
		// More than the capacity never fits.
		{"over capacity", 30_001, map[string]string{"status": "Too Many Requests", "limit": "30000", "remaining": "10000", "reset": at(40 * time.Second), "retry-after": "40", "x-should-retry": "true"}},
	}
	for _, tt := range tests {
		res, b := post(t, srv, "/v1/messages", rawBody(promptOf(tt.tokens), 10, false), nil)
		if diff := cmp.Diff(tt.want, limitHeaders(res, "input-tokens")); diff != "" {
			t.Errorf("%s: input-tokens headers (-want +got):\n%s", tt.name, diff)
		}
		if res.StatusCode == 429 {
			if e := decodeError(t, res, b); !strings.Contains(e.Error.Message, "of 30,000 input tokens per minute") {
				t.Errorf("%s: message %q: want it to name 30,000 input tokens per minute", tt.name, e.Error.Message)
			}
		}
	}

	clk.Advance(20 * time.Second)
	if res, b := post(t, srv, "/v1/messages", rawBody(promptOf(20_000), 10, false), nil); res.StatusCode != 200 {
		t.Fatalf("after 20 s: status %d (%s), want 200", res.StatusCode, b)
	}
}

func TestTokensHeaderIsTheMostRestrictive(t *testing.T) {
	_, srv := newFake(t, fakeanthropic.Config{Groups: oneGroup(1000, 30_000, 8_000), Clock: newTestClock().Now})
	res, _ := post(t, srv, "/v1/messages", rawBody(promptOf(1_400), 10, false), nil)
	for axis, want := range map[string]string{"limit": "8000", "remaining": "8000"} {
		if got := res.Header.Get("anthropic-ratelimit-tokens-" + axis); got != want {
			t.Errorf("tokens-%s %q: want the output axis, %q", axis, got, want)
		}
	}
	if res.Header.Get("anthropic-ratelimit-tokens-reset") != res.Header.Get("anthropic-ratelimit-output-tokens-reset") {
		t.Errorf("tokens-reset %q: want the output axis's", res.Header.Get("anthropic-ratelimit-tokens-reset"))
	}
}

func TestOutputTokensReserveMode(t *testing.T) {
	clk := newTestClock()
	_, srv := newFake(t, fakeanthropic.Config{Groups: oneGroup(1000, 1_000_000, 8_000), OTPMMode: fakeanthropic.OTPMReserve, Clock: clk.Now})
	at := func(d time.Duration) string { return clk.Now().Add(d).Format(time.RFC3339) }
	reply := "go [[reply_tokens=1000]]"

	tests := []struct {
		name      string
		maxTokens int
		want      map[string]string
	}{
		// 5,000 reserved of 8,000: 3,000 left while it runs (full in 37.5 s,
		// rounded up); 1,000 used, 4,000 given back.
		{"reserves max_tokens", 5_000, map[string]string{"status": "OK", "limit": "8000", "remaining": "3000", "reset": at(38 * time.Second), "retry-after": "", "x-should-retry": ""}},
		// 7,000 left after the refund, so 5,000 fits again (it would not without the refund).
		{"refund made room", 5_000, map[string]string{"status": "OK", "limit": "8000", "remaining": "2000", "reset": at(45 * time.Second), "retry-after": "", "x-should-retry": ""}},
		// 6,000 left, 7,000 wanted, 133.3 a second: 7.5 s.
		{"refused", 7_000, map[string]string{"status": "Too Many Requests", "limit": "8000", "remaining": "6000", "reset": at(15 * time.Second), "retry-after": "8", "x-should-retry": "true"}},
		{"over capacity", 8_001, map[string]string{"status": "Too Many Requests", "limit": "8000", "remaining": "6000", "reset": at(15 * time.Second), "retry-after": "15", "x-should-retry": "true"}},
	}
	for _, tt := range tests {
		res, b := post(t, srv, "/v1/messages", rawBody(reply, tt.maxTokens, false), nil)
		if diff := cmp.Diff(tt.want, limitHeaders(res, "output-tokens")); diff != "" {
			t.Errorf("%s: output-tokens headers (-want +got):\n%s", tt.name, diff)
		}
		if res.StatusCode == 429 {
			if e := decodeError(t, res, b); !strings.Contains(e.Error.Message, "of 8,000 output tokens per minute") {
				t.Errorf("%s: message %q: want it to name 8,000 output tokens per minute", tt.name, e.Error.Message)
			}
		}
	}
}

func TestOutputTokensRealtimeMode(t *testing.T) {
	clk := newTestClock()
	fake, srv := newFake(t, fakeanthropic.Config{Groups: oneGroup(1000, 1_000_000, 8_000), OTPMMode: fakeanthropic.OTPMRealtime, Clock: clk.Now})
	at := func(d time.Duration) string { return clk.Now().Add(d).Format(time.RFC3339) }

	// max_tokens above the capacity is no obstacle: only produced tokens count.
	res, b := post(t, srv, "/v1/messages", rawBody("go [[reply_tokens=9000]]", 20_000, true), nil)
	want := map[string]string{"status": "OK", "limit": "8000", "remaining": "8000", "reset": at(0), "retry-after": "", "x-should-retry": ""}
	if diff := cmp.Diff(want, limitHeaders(res, "output-tokens")); diff != "" {
		t.Fatalf("first request (%.100s): output-tokens headers (-want +got):\n%s", b, diff)
	}
	if got := fake.Stats().AdmittedOutputTokens["claude"]; got != 9000 {
		t.Fatalf("admitted output tokens %d: want 9000", got)
	}

	// The bucket is 1,000 in debt: refused until it is above zero again.
	res, _ = post(t, srv, "/v1/messages", rawBody("go", 1, false), nil)
	want = map[string]string{"status": "Too Many Requests", "limit": "8000", "remaining": "0", "reset": at(68 * time.Second), "retry-after": "8", "x-should-retry": "true"}
	if diff := cmp.Diff(want, limitHeaders(res, "output-tokens")); diff != "" {
		t.Errorf("in debt: output-tokens headers (-want +got):\n%s", diff)
	}

	clk.Advance(8 * time.Second)
	if res, b := post(t, srv, "/v1/messages", rawBody("go", 1, false), nil); res.StatusCode != 200 {
		t.Fatalf("after 8 s: status %d (%s), want 200", res.StatusCode, b)
	}
}

func TestCountTokensEndpoint(t *testing.T) {
	clk := newTestClock()
	fake, srv := newFake(t, fakeanthropic.Config{Groups: oneGroup(2, 30_000, 8_000), Clock: clk.Now})
	body := `{"model":"claude-haiku-4-5","system":"Be brief.","messages":[{"role":"user","content":"Hello there"}]}`
	want, err := fakeanthropic.CountTokens([]byte(body))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		res, b := post(t, srv, "/v1/messages/count_tokens", body, nil)
		var got struct {
			InputTokens int `json:"input_tokens"`
		}
		if err := json.Unmarshal(b, &got); err != nil || res.StatusCode != 200 || got.InputTokens != want {
			t.Fatalf("call %d: status %d, body %s: want 200 {\"input_tokens\":%d}", i, res.StatusCode, b, want)
		}
	}
	res, b := post(t, srv, "/v1/messages/count_tokens", body, nil)
	if res.StatusCode != 429 || res.Header.Get("retry-after") != "30" {
		t.Fatalf("third call: status %d, retry-after %q (%s): want 429 after 30 s", res.StatusCode, res.Header.Get("retry-after"), b)
	}
	decodeError(t, res, b)

	// count_tokens has its own bucket: Messages calls still fit.
	if res, b := post(t, srv, "/v1/messages", rawBody("hi", 10, false), nil); res.StatusCode != 200 {
		t.Fatalf("messages after count_tokens: status %d (%s)", res.StatusCode, b)
	}
	st := fake.Stats()
	if st.CountTokensRequests != 3 || st.Requests != 1 {
		t.Errorf("stats: %d count_tokens requests, %d requests: want 3 and 1", st.CountTokensRequests, st.Requests)
	}
}

func TestGroupsHaveTheirOwnBuckets(t *testing.T) {
	fake, srv := newFake(t, fakeanthropic.Config{
		Groups: []fakeanthropic.Group{
			{Name: "sonnet", Models: []string{"claude-sonnet-*"}, RPM: 1, InputTPM: 10_000, OutputTPM: 1_000},
			{Name: "opus", Models: []string{"claude-opus-4-1", "claude-opus-4-5"}, RPM: 1, InputTPM: 10_000, OutputTPM: 1_000},
			{Name: "rest", Models: []string{"claude-*"}, RPM: 1, InputTPM: 10_000, OutputTPM: 1_000},
		},
		Clock: newTestClock().Now,
	})
	send := func(model string) int {
		res, _ := post(t, srv, "/v1/messages", `{"model":"`+model+`","max_tokens":5,"messages":[{"role":"user","content":"x"}]}`, nil)
		return res.StatusCode
	}
	got := []int{send("claude-sonnet-4-5"), send("claude-opus-4-1"), send("claude-sonnet-4-6"), send("claude-opus-4-5"), send("claude-haiku-4-5"), send("other")}
	if diff := cmp.Diff([]int{200, 200, 429, 429, 200, 404}, got); diff != "" {
		t.Errorf("statuses (-want +got):\n%s", diff)
	}
	want := map[string]int64{"sonnet": 1, "opus": 1, "rest": 1}
	if diff := cmp.Diff(want, fake.Stats().AdmittedRequests); diff != "" {
		t.Errorf("admitted requests by group (-want +got):\n%s", diff)
	}
}
