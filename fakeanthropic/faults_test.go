package fakeanthropic_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/google/go-cmp/cmp"

	"github.com/sluice-dev/sluice/fakeanthropic"
)

// sdkError is what a test needs to know of an *anthropic.Error.
type sdkError struct {
	Status      int
	Type        string
	Code        string
	RetryAfter  string
	ShouldRetry string
	HasLimits   bool // anthropic-ratelimit-* headers present
}

// asSDKError returns the *anthropic.Error in err, or fails the test.
func asSDKError(t testing.TB, err error) sdkError {
	t.Helper()
	var apiErr *anthropic.Error
	if !errors.As(err, &apiErr) {
		t.Fatalf("error %v (%T): want *anthropic.Error", err, err)
	}
	h := apiErr.Response.Header
	return sdkError{
		Status:      apiErr.StatusCode,
		Type:        string(apiErr.Type()),
		Code:        string(apiErr.ErrorCode()),
		RetryAfter:  h.Get("retry-after"),
		ShouldRetry: h.Get("x-should-retry"),
		HasLimits:   h.Get("anthropic-ratelimit-requests-remaining") != "",
	}
}

func TestFaultsNonStreaming(t *testing.T) {
	tests := []struct {
		rule      fakeanthropic.FaultRule
		want      sdkError
		wantPlain bool // a connection error, not an *anthropic.Error
	}{
		{rule: fakeanthropic.FaultRule{Kind: fakeanthropic.FaultOverloaded},
			want: sdkError{Status: 529, Type: "overloaded_error", ShouldRetry: "true"}},
		{rule: fakeanthropic.FaultRule{Kind: fakeanthropic.FaultAPIError},
			want: sdkError{Status: 500, Type: "api_error", ShouldRetry: "true"}},
		{rule: fakeanthropic.FaultRule{Kind: fakeanthropic.FaultUnavailable},
			want: sdkError{Status: 503, Type: "api_error", RetryAfter: "1", ShouldRetry: "true"}},
		{rule: fakeanthropic.FaultRule{Kind: fakeanthropic.FaultRateLimit, RetryAfter: 2 * time.Second},
			want: sdkError{Status: 429, Type: "rate_limit_error", RetryAfter: "2", ShouldRetry: "true", HasLimits: true}},
		{rule: fakeanthropic.FaultRule{Kind: fakeanthropic.FaultRateLimit},
			want: sdkError{Status: 429, Type: "rate_limit_error", RetryAfter: "1", ShouldRetry: "true", HasLimits: true}},
		{rule: fakeanthropic.FaultRule{Kind: fakeanthropic.FaultSpendLimit},
			want: sdkError{Status: 429, Type: "rate_limit_error", Code: "enforced_spend_limit_reached", ShouldRetry: "false", HasLimits: true}},
		{rule: fakeanthropic.FaultRule{Kind: fakeanthropic.FaultRampLimit, RetryAfter: 1500 * time.Millisecond},
			want: sdkError{Status: 429, Type: "rate_limit_error", Code: "ramp_limit_exceeded", RetryAfter: "2", ShouldRetry: "true", HasLimits: true}},
		{rule: fakeanthropic.FaultRule{Kind: fakeanthropic.FaultBadRequest},
			want: sdkError{Status: 400, Type: "invalid_request_error"}},
		{rule: fakeanthropic.FaultRule{Kind: fakeanthropic.FaultTimeout},
			want: sdkError{Status: 504, Type: "timeout_error", ShouldRetry: "true"}},
		// Without a stream to break, a stream error is a plain 529.
		{rule: fakeanthropic.FaultRule{Kind: fakeanthropic.FaultStreamError},
			want: sdkError{Status: 529, Type: "overloaded_error", ShouldRetry: "true"}},
		{rule: fakeanthropic.FaultRule{Kind: fakeanthropic.FaultStreamCut}, wantPlain: true},
		{rule: fakeanthropic.FaultRule{Kind: fakeanthropic.FaultDrop}, wantPlain: true},
	}
	for _, tt := range tests {
		t.Run(string(tt.rule.Kind), func(t *testing.T) {
			fake, srv := newFake(t, fakeanthropic.Config{})
			client := newClient(srv)
			fake.QueueFaults(tt.rule)
			_, err := client.Messages.New(ctxWithTimeout(t), userParams("hi", 10))
			if tt.wantPlain {
				var apiErr *anthropic.Error
				if err == nil || errors.As(err, &apiErr) {
					t.Fatalf("error %v: want a connection error, not an *anthropic.Error", err)
				}
			} else if diff := cmp.Diff(tt.want, asSDKError(t, err)); diff != "" {
				t.Errorf("SDK error (-want +got):\n%s", diff)
			}
			// The fault was used up: the next call succeeds.
			if _, err := client.Messages.New(ctxWithTimeout(t), userParams("hi", 10)); err != nil {
				t.Errorf("call after the fault: %v", err)
			}
		})
	}
}

// streamResult is what a client sees of a stream.
type streamResult struct {
	Deltas      int
	SawStop     bool // message_stop arrived
	Err         error
	Accumulated string
}

func consume(t testing.TB, client anthropic.Client, params anthropic.MessageNewParams) streamResult {
	t.Helper()
	stream := client.Messages.NewStreaming(ctxWithTimeout(t), params)
	defer stream.Close()
	var r streamResult
	var acc anthropic.Message
	for stream.Next() {
		ev := stream.Current()
		switch ev.Type {
		case "content_block_delta":
			r.Deltas++
		case "message_stop":
			r.SawStop = true
		}
		if err := acc.Accumulate(ev); err != nil {
			t.Fatalf("Accumulate: %v", err)
		}
	}
	r.Err = stream.Err()
	if len(acc.Content) > 0 {
		r.Accumulated = acc.Content[0].Text
	}
	return r
}

func TestFaultsStreaming(t *testing.T) {
	params := userParams("hi [[reply_tokens=9]]", 100)

	t.Run("stream_error", func(t *testing.T) {
		fake, srv := newFake(t, fakeanthropic.Config{})
		fake.QueueFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultStreamError})
		r := consume(t, newClient(srv), params)
		if r.Deltas != 5 || r.SawStop {
			t.Errorf("%d deltas, message_stop %v: want 5 of 9, no message_stop", r.Deltas, r.SawStop)
		}
		// Mid-stream errors arrive with the stream's status, 200.
		want := sdkError{Status: 200, Type: "overloaded_error", HasLimits: true}
		if diff := cmp.Diff(want, asSDKError(t, r.Err)); diff != "" {
			t.Errorf("stream error (-want +got):\n%s", diff)
		}
	})

	t.Run("stream_cut", func(t *testing.T) {
		fake, srv := newFake(t, fakeanthropic.Config{})
		fake.QueueFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultStreamCut})
		r := consume(t, newClient(srv), params)
		// The SDK reports no error: only the missing message_stop shows the cut.
		if r.Err != nil || r.SawStop || r.Deltas != 5 || len(strings.Fields(r.Accumulated)) != 5 {
			t.Errorf("got %+v: want no error, no message_stop, 5 of 9 deltas", r)
		}
		if got := fake.Stats().AdmittedOutputTokens["claude"]; got != 5 {
			t.Errorf("admitted output tokens %d: want the 5 produced", got)
		}
	})

	t.Run("overloaded before the stream", func(t *testing.T) {
		fake, srv := newFake(t, fakeanthropic.Config{})
		fake.QueueFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultOverloaded})
		r := consume(t, newClient(srv), params)
		if r.Deltas != 0 || asSDKError(t, r.Err).Status != 529 {
			t.Errorf("got %+v: want a 529 and no events", r)
		}
	})

	t.Run("drop", func(t *testing.T) {
		fake, srv := newFake(t, fakeanthropic.Config{})
		fake.QueueFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultDrop})
		r := consume(t, newClient(srv), params)
		var apiErr *anthropic.Error
		if r.Err == nil || errors.As(r.Err, &apiErr) {
			t.Errorf("error %v: want a connection error", r.Err)
		}
		st := fake.Stats()
		if st.Dropped != 1 || len(st.ByStatus) != 0 || st.Log[0].Status != 0 || st.Log[0].Fault != fakeanthropic.FaultDrop {
			t.Errorf("stats %+v: want one dropped request, no answers", st)
		}
	})
}

func TestQueueFaultsOrder(t *testing.T) {
	fake, srv := newFake(t, fakeanthropic.Config{})
	fake.QueueFaults(
		fakeanthropic.FaultRule{Kind: fakeanthropic.FaultOverloaded},
		fakeanthropic.FaultRule{Kind: fakeanthropic.FaultAPIError},
	)
	fake.QueueFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultTimeout})
	var got []int
	for range 4 {
		res, _ := post(t, srv, "/v1/messages", rawBody("hi", 10, false), nil)
		got = append(got, res.StatusCode)
	}
	if diff := cmp.Diff([]int{529, 500, 504, 200}, got); diff != "" {
		t.Errorf("statuses (-want +got):\n%s", diff)
	}
	var faults []fakeanthropic.FaultKind
	for _, rec := range fake.Stats().Log {
		faults = append(faults, rec.Fault)
	}
	want := []fakeanthropic.FaultKind{fakeanthropic.FaultOverloaded, fakeanthropic.FaultAPIError, fakeanthropic.FaultTimeout, ""}
	if diff := cmp.Diff(want, faults); diff != "" {
		t.Errorf("logged faults (-want +got):\n%s", diff)
	}
}

func TestQueuedFaultsSkipMalformedRequests(t *testing.T) {
	fake, srv := newFake(t, fakeanthropic.Config{})
	fake.QueueFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultOverloaded})
	var got []int
	for _, body := range []string{`{}`, rawBody("hi", 10, false), rawBody("hi", 10, false)} {
		res, _ := post(t, srv, "/v1/messages", body, nil)
		got = append(got, res.StatusCode)
	}
	if diff := cmp.Diff([]int{400, 529, 200}, got); diff != "" {
		t.Errorf("statuses (-want +got):\n%s", diff)
	}
}

func TestErrorFaultsCostNothingStreamFaultsAreCharged(t *testing.T) {
	clk := newTestClock()
	fake, srv := newFake(t, fakeanthropic.Config{Groups: oneGroup(1, 30_000, 8_000), Clock: clk.Now})
	client := newClient(srv)
	fake.QueueFaults(
		fakeanthropic.FaultRule{Kind: fakeanthropic.FaultOverloaded},
		fakeanthropic.FaultRule{Kind: fakeanthropic.FaultRateLimit},
		fakeanthropic.FaultRule{Kind: fakeanthropic.FaultSpendLimit},
		fakeanthropic.FaultRule{Kind: fakeanthropic.FaultStreamCut},
	)
	var got []int
	for range 3 {
		res, _ := post(t, srv, "/v1/messages", rawBody("hi", 10, false), nil)
		got = append(got, res.StatusCode)
	}
	// The only request of the minute is still free: the cut stream takes it.
	r := consume(t, client, userParams("hi", 10))
	if r.Err != nil || r.SawStop {
		t.Fatalf("cut stream: %+v", r)
	}
	res, _ := post(t, srv, "/v1/messages", rawBody("hi", 10, false), nil)
	got = append(got, res.StatusCode)
	if diff := cmp.Diff([]int{529, 429, 429, 429}, got); diff != "" {
		t.Errorf("statuses (-want +got):\n%s", diff)
	}
	if res.Header.Get("retry-after") != "60" {
		t.Errorf("retry-after %q after the cut stream: want 60, the request bucket is empty", res.Header.Get("retry-after"))
	}

	st := fake.Stats()
	want := map[int]int64{200: 1, 429: 3, 529: 1}
	if diff := cmp.Diff(want, st.ByStatus); diff != "" {
		t.Errorf("by status (-want +got):\n%s", diff)
	}
	if st.RateLimited != 3 || st.AdmittedRequests["claude"] != 1 {
		t.Errorf("rate limited %d, admitted %d: want 3 and 1", st.RateLimited, st.AdmittedRequests["claude"])
	}
}

func TestQueuedStreamFaultWaitsForAnAdmittedRequest(t *testing.T) {
	clk := newTestClock()
	fake, srv := newFake(t, fakeanthropic.Config{Groups: oneGroup(1, 30_000, 8_000), Clock: clk.Now})
	client := newClient(srv)
	if res, _ := post(t, srv, "/v1/messages", rawBody("hi", 10, false), nil); res.StatusCode != 200 {
		t.Fatalf("first request: %d", res.StatusCode)
	}
	fake.QueueFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultStreamError})
	if res, _ := post(t, srv, "/v1/messages", rawBody("hi", 10, true), nil); res.StatusCode != 429 {
		t.Fatalf("second request: %d, want 429 from the empty bucket", res.StatusCode)
	}
	clk.Advance(time.Minute)
	r := consume(t, client, userParams("hi", 10))
	if asSDKError(t, r.Err).Type != "overloaded_error" {
		t.Errorf("stream after the refill: %+v, want the queued stream error", r)
	}
}

func TestRandomFaults(t *testing.T) {
	t.Run("rate 1", func(t *testing.T) {
		_, srv := newFake(t, fakeanthropic.Config{Faults: []fakeanthropic.FaultRule{{Kind: fakeanthropic.FaultOverloaded, Rate: 1}}})
		for range 3 {
			if res, _ := post(t, srv, "/v1/messages", rawBody("hi", 10, false), nil); res.StatusCode != 529 {
				t.Fatalf("status %d, want 529", res.StatusCode)
			}
		}
	})

	t.Run("seeded", func(t *testing.T) {
		run := func() []int {
			cfg := fakeanthropic.Config{Seed: 7, Groups: oneGroup(1000, 1_000_000, 100_000), Faults: []fakeanthropic.FaultRule{
				{Kind: fakeanthropic.FaultOverloaded, Rate: 0.3},
				{Kind: fakeanthropic.FaultAPIError, Rate: 0.2},
			}}
			_, srv := newFake(t, cfg)
			var statuses []int
			for range 40 {
				res, _ := post(t, srv, "/v1/messages", rawBody("hi", 10, false), nil)
				statuses = append(statuses, res.StatusCode)
			}
			return statuses
		}
		first, second := run(), run()
		if diff := cmp.Diff(first, second); diff != "" {
			t.Errorf("same seed, different faults (-first +second):\n%s", diff)
		}
		count := map[int]int{}
		for _, s := range first {
			count[s]++
		}
		if count[200] == 0 || count[529] == 0 || count[500] == 0 || count[200]+count[529]+count[500] != 40 {
			t.Errorf("statuses %v: want a mix of 200, 529 and 500", count)
		}
	})

	t.Run("queued first", func(t *testing.T) {
		fake, srv := newFake(t, fakeanthropic.Config{Faults: []fakeanthropic.FaultRule{{Kind: fakeanthropic.FaultOverloaded, Rate: 1}}})
		fake.QueueFaults(fakeanthropic.FaultRule{Kind: fakeanthropic.FaultTimeout})
		var got []int
		for range 2 {
			res, _ := post(t, srv, "/v1/messages", rawBody("hi", 10, false), nil)
			got = append(got, res.StatusCode)
		}
		if diff := cmp.Diff([]int{504, 529}, got); diff != "" {
			t.Errorf("statuses (-want +got):\n%s", diff)
		}
	})
}

func TestQueueFaultsPanicsOnUnknownKind(t *testing.T) {
	fake, _ := newFake(t, fakeanthropic.Config{})
	defer func() {
		if recover() == nil {
			t.Error("QueueFaults of an unknown kind did not panic")
		}
	}()
	fake.QueueFaults(fakeanthropic.FaultRule{Kind: "gremlins"})
}
