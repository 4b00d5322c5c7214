package scheduler_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/scheduler"
)

// With output counted as it is produced, a dispatch holds the output the
// call is expected to produce (learned from the group's answers), not
// max_tokens: calls whose max_tokens exceeds the whole bucket run several
// at once; with output reserved (the older rule) they run one by one.
func TestProducedOutputHoldsExpectedOutputNotMaxTokens(t *testing.T) {
	for _, tc := range []struct {
		mode   string
		atOnce int
	}{{config.OutputProduced, 3}, {config.OutputReserved, 0}} { // reserved: each waits for a full bucket
		t.Run(tc.mode, func(t *testing.T) {
			// OTPM 8,000: the bucket holds 7,600.
			e := newEnv(t, config.ModelGroup{RPM: 100000, InputTPM: 10000000, OutputTPM: 8000, OutputAccounting: tc.mode})
			first := e.admit(t, "u", 10, 8192, 1)
			// No answer seen yet: max_tokens is held (the whole bucket, and
			// more: it goes 592 below zero, as the upstream's may).
			if r := e.dispatch(t, 10); len(r.Jobs) != 1 {
				t.Fatalf("first: %+v", r)
			}
			if l := e.levels(t); !near(l.Output, 7600-8192) {
				t.Fatalf("after the first dispatch: output level %v, want %v", l.Output, 7600-8192)
			}
			// Nothing goes while the bucket is at or below zero.
			e.admit(t, "v", 10, 8192, 1)
			if r := e.dispatch(t, 10); len(r.Jobs) != 0 || r.State != scheduler.Wait {
				t.Fatalf("dispatched with the output bucket below zero: %+v", r)
			}
			// The answer: 1,000 tokens. Its settlement gives back the rest;
			// the group learns that answers are ~1,000 tokens.
			if ok, err := e.settle(first, scheduler.Used{Requests: 1, Input: 10, Output: 1000}, 20*time.Second); !ok || err != nil {
				t.Fatalf("settle: %v %v", ok, err)
			}
			if l := e.levels(t); !near(l.Output, 7600-1000) {
				t.Fatalf("after settlement: output level %v, want %v", l.Output, 6600)
			}
			e.admit(t, "w", 10, 8192, 1)
			e.admit(t, "x", 10, 8192, 1)
			e.admit(t, "y", 10, 8192, 1)
			r := e.dispatch(t, 10)
			if len(r.Jobs) != tc.atOnce {
				t.Fatalf("%d calls at once with 6,600 output tokens free and max_tokens 8,192; want %d (%+v)", len(r.Jobs), tc.atOnce, r)
			}
			if tc.mode == config.OutputProduced {
				// Expected output: mean 1,000 + 2 × deviation 500 = 2,000 each.
				if l := e.levels(t); !near(l.Output, 6600-3*2000) {
					t.Fatalf("output level %v after three expected-output holds, want %v", l.Output, 6600-6000)
				}
			}
		})
	}
}

// The upstream's output-tokens-remaining header lowers the bucket when it
// says less remains than sluice holds (another client of the account, or
// answers longer than expected); settlement then corrects each call to its
// real output.
func TestProducedOutputCorrectedByHeaders(t *testing.T) {
	e := newEnv(t, config.ModelGroup{RPM: 100000, InputTPM: 10000000, OutputTPM: 8000})
	h := http.Header{}
	h.Set("anthropic-ratelimit-output-tokens-limit", "8000")
	h.Set("anthropic-ratelimit-output-tokens-remaining", "3000") // 2,500 after rounding, 2,100 in a 7,600 bucket
	if _, err := e.s.Observe(context.Background(), e.g, h, true); err != nil {
		t.Fatal(err)
	}
	if l := e.levels(t); !near(l.Output, 2100) {
		t.Fatalf("output level %v after the header, want 2100", l.Output)
	}
	// A call that produced more than it held is charged the difference.
	id := e.admit(t, "u", 10, 500, 1)
	if r := e.dispatch(t, 10); len(r.Jobs) != 1 {
		t.Fatalf("%+v", r)
	}
	if _, err := e.settle(id, scheduler.Used{Requests: 1, Input: 10, Output: 500}, time.Second); err != nil {
		t.Fatal(err)
	}
	if l := e.levels(t); !near(l.Output, 1600) {
		t.Fatalf("output level %v after a 500-token answer, want 1600", l.Output)
	}
}
