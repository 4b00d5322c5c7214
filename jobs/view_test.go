package jobs_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/jobs"
)

// Every time the API writes has exactly three fractional digits.
func TestViewTimesHaveMilliseconds(t *testing.T) {
	at := time.Date(2026, 11, 29, 20, 24, 3, 590_000_000, time.UTC)
	whole := time.Date(2026, 11, 29, 20, 24, 3, 0, time.UTC)
	b, err := json.Marshal(jobs.View{ID: "job_x", CreatedAt: at, StartedAt: &whole})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"created_at":"2026-11-29T20:24:03.590Z"`, `"started_at":"2026-11-29T20:24:03.000Z"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("%s lacks %s", b, want)
		}
	}
	if strings.Contains(string(b), "finished_at") {
		t.Errorf("%s: an unset time is written", b)
	}
	var back jobs.View
	if err := json.Unmarshal(b, &back); err != nil || !back.CreatedAt.Equal(at) || !back.StartedAt.Equal(whole) {
		t.Fatalf("round trip: %+v %v", back, err)
	}
}
