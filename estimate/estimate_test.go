package estimate_test

import (
	"context"
	"encoding/json"
	"math"
	"strings"
	"testing"

	"github.com/sluice-dev/sluice/estimate"
	"github.com/sluice-dev/sluice/fakeanthropic"
	"github.com/sluice-dev/sluice/internal/redistest"
)

func body(t *testing.T, system string, msgs ...string) []byte {
	t.Helper()
	var ms []map[string]string
	for i, m := range msgs {
		role := "user"
		if i%2 == 1 {
			role = "assistant"
		}
		ms = append(ms, map[string]string{"role": role, "content": m})
	}
	req := map[string]any{"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": ms}
	if system != "" {
		req["system"] = system
	}
	b, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Raw must not under-count against bytes/4 (the fake's rule) by the margins
// the Anthropic tokenizer shows for code, JSON and non-Latin text.
func TestRawIsConservative(t *testing.T) {
	code := strings.Repeat("func (s *Server) Get(ctx context.Context, id string) (*Job, error) { return s.m[id], nil }\n", 20)
	js := strings.Repeat(`{"id":123,"tags":["a","b"],"ok":true,"nested":{"x":[1,2,3]}},`, 30)
	tests := []struct {
		name   string
		body   []byte
		factor float64 // how far bytes/4 under-counts this kind of text
	}{
		{"prose", body(t, "You are helpful.", "Hello there, how are you today? I would like to know about token buckets."), 1.0},
		{"code", body(t, "", code), 1.29},
		{"json", body(t, "", js), 1.58},
		{"korean", body(t, "", strings.Repeat("안녕하세요 토큰 버킷에 대해 알려주세요", 10)), 2.5},
		{"one character", body(t, "", "a"), 1.0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fake, err := fakeanthropic.CountTokens(tc.body)
			if err != nil {
				t.Fatal(err)
			}
			want := int(math.Ceil(float64(fake) * tc.factor))
			if got := estimate.Raw(tc.body); got < want {
				t.Fatalf("Raw = %d, below the real count's %d (bytes/4 = %d × %.2f)", got, want, fake, tc.factor)
			}
		})
	}
}

func TestCalibrationConverges(t *testing.T) {
	r := redistest.Start(t)
	a := estimate.NewCalibrator(r.Client(t))
	b := estimate.NewCalibrator(r.Client(t)) // another process
	ctx := context.Background()
	if got := a.Ratio(ctx, "m"); got != 1 {
		t.Fatalf("initial ratio %v", got)
	}
	for range 30 {
		if err := a.Observe(ctx, "m", 1000, 600); err != nil {
			t.Fatal(err)
		}
	}
	if got := a.Ratio(ctx, "m"); math.Abs(got-0.6) > 0.01 {
		t.Fatalf("ratio after 30 observations of 0.6: %v", got)
	}
	// The other process learns it from Redis.
	if got := b.Ratio(ctx, "m"); math.Abs(got-0.6) > 0.01 {
		t.Fatalf("other process sees ratio %v", got)
	}
	if got := estimate.Calibrated(1000, 0.6, estimate.Margin); got != 660 {
		t.Fatalf("calibrated = %d, want 660", got)
	}
	if got := b.Ratio(ctx, "other-model"); got != 1 {
		t.Fatalf("an unseen model's ratio is %v", got)
	}
}
