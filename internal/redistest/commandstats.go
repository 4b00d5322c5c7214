package redistest

import (
	"context"
	"strconv"
	"strings"
	"testing"

	"github.com/redis/go-redis/v9"
)

// ScriptTime is how long one Redis spent running scripts (EVALSHA and
// EVAL, commands they call included) and how many script calls it ran,
// as INFO commandstats counts them since the last CONFIG RESETSTAT: the
// benchmarks' measure of Redis time per admission.
func ScriptTime(tb testing.TB, rdb redis.Cmdable) (usec float64, calls int64) {
	tb.Helper()
	stats, err := rdb.Info(context.Background(), "commandstats").Result()
	if err != nil {
		tb.Fatalf("redistest: INFO commandstats: %v", err)
	}
	for _, line := range strings.Split(stats, "\n") {
		if !strings.HasPrefix(line, "cmdstat_evalsha:") && !strings.HasPrefix(line, "cmdstat_eval:") {
			continue
		}
		for _, f := range strings.Split(strings.TrimSpace(line[strings.IndexByte(line, ':')+1:]), ",") {
			if v, ok := strings.CutPrefix(f, "usec="); ok {
				x, _ := strconv.ParseFloat(v, 64)
				usec += x
			}
			if v, ok := strings.CutPrefix(f, "calls="); ok {
				x, _ := strconv.ParseInt(v, 10, 64)
				calls += x
			}
		}
	}
	return usec, calls
}
