package scheduler_test

import (
	"testing"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/sluice-dev/sluice/internal/redistest"
)

// TestMain fails the package's tests if goroutines are left running after
// them.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// inEachMode runs fn against one Redis and against a 3-node Redis Cluster
// (where every script must keep to one slot), as subtests.
func inEachMode(t *testing.T, fn func(t *testing.T, rdb redis.UniversalClient)) {
	for _, mode := range []string{"single", "cluster"} {
		t.Run(mode, func(t *testing.T) {
			var rdb redis.UniversalClient
			if mode == "cluster" {
				rdb = redistest.StartCluster(t, redistest.ClusterOptions{Masters: 3}).Client(t)
			} else {
				rdb = redistest.Start(t).Client(t)
			}
			fn(t, rdb)
		})
	}
}
