package api_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/harness"
	"github.com/sluice-dev/sluice/internal/redistest"
)

// BenchmarkAdmissionWaitReplicas is BenchmarkAdmission against a primary
// with one replica, with redis.wait_replicas 0 (replication asynchronous:
// a failover can lose the last admissions) and 1 (each admission waits
// until the replica has it: WAIT 1 on the admission's connection).
//
//	go test -run '^$' -bench 'AdmissionWaitReplicas' -benchtime 20000x ./api/
func BenchmarkAdmissionWaitReplicas(b *testing.B) {
	for _, n := range []int{0, 1} {
		b.Run(map[int]string{0: "wait_replicas=0", 1: "wait_replicas=1"}[n], func(b *testing.B) {
			e := harness.Start(b, harness.Options{NoWorker: true, Quiet: true,
				TenantExtra: "    requests_per_hour: 100000000\n    tokens_per_hour: 1000000000000\n    max_queued: 0\n    max_wait: 0s\n",
				ExtraConfig: "redis:\n  wait_replicas: " + map[int]string{0: "0", 1: "1"}[n] + "\n  wait_timeout: 1s\n"})
			i := strings.LastIndexByte(e.Redis.Addr, ':')
			replica := redistest.StartArgs(b, "--replicaof", e.Redis.Addr[:i], e.Redis.Addr[i+1:])
			rc := replica.Client(b)
			harness.Eventually(b, 30*time.Second, func() bool {
				info, err := rc.Info(context.Background(), "replication").Result()
				return err == nil && strings.Contains(info, "master_link_status:up")
			}, "the replica to sync")
			drive(b, e.API.URL+"/v1/jobs", 10000)
		})
	}
}
