package api_test

import (
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/harness"
)

// BenchmarkIdleLatency measures what sluice adds on an idle system: from
// sending POST /v1/jobs to the upstream (the fake) receiving the call. One job
// at a time, each waited for, so the system is idle when the next arrives.
// Reports p50 and p99 in ms.
//
//	go test -run '^$' -bench IdleLatency -benchtime 300x ./api/
func BenchmarkIdleLatency(b *testing.B) {
	e := harness.Start(b, harness.Options{})
	body := harness.JobBody("idle", "hi [[reply_tokens=1]]")
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		before := len(e.Fake.Stats().Log)
		start := time.Now()
		resp, out := e.Do(b, http.MethodPost, "/v1/jobs", harness.TenantKey, body)
		if resp.StatusCode != http.StatusAccepted {
			b.Fatalf("submit: %d %s", resp.StatusCode, out)
		}
		var at time.Time
		harness.Eventually(b, 10*time.Second, func() bool {
			log := e.Fake.Stats().Log
			if len(log) > before {
				at = log[before].At
				return true
			}
			return false
		}, "the upstream call")
		lat = append(lat, at.Sub(start))
		// Let the job finish so the next one starts on an idle system.
		harness.Eventually(b, 10*time.Second, func() bool { return e.Fake.Stats().InFlight == 0 }, "idle")
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(ms(lat[len(lat)/2]), "p50-ms")
	b.ReportMetric(ms(lat[len(lat)*99/100]), "p99-ms")
	b.ReportMetric(ms(lat[len(lat)-1]), "max-ms")
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
