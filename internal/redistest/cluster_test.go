package redistest

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"
)

// The cluster serves keys on all three masters, and MasterFor names the
// one that holds each.
func TestClusterStarts(t *testing.T) {
	c := StartCluster(t, ClusterOptions{})
	ctx := context.Background()
	cl := c.Client(t)
	want := map[string]int64{}
	for i := 0; i < 60; i++ {
		k := fmt.Sprintf("k%d", i)
		if err := cl.Set(ctx, k, i, 0).Err(); err != nil {
			t.Fatal(err)
		}
		want[c.MasterFor(t, k).Addr]++
	}
	if len(want) != 3 {
		t.Fatalf("60 keys landed on %d masters, want 3: %v", len(want), want)
	}
	for _, m := range c.Masters {
		if n, err := m.Client(t).DBSize(ctx).Result(); err != nil || n != want[m.Addr] {
			t.Errorf("master %s holds %d keys (%v), MasterFor says %d", m.Addr, n, err, want[m.Addr])
		}
	}
}

// Killing a master promotes its replica, which has its keys.
func TestClusterFailover(t *testing.T) {
	c := StartCluster(t, ClusterOptions{Masters: 3, ReplicasPerMaster: 1, NodeTimeout: time.Second})
	ctx := context.Background()
	cl := c.Client(t)
	const tag = "{failover}"
	victim := c.MasterFor(t, tag)
	for i := 0; i < 20; i++ {
		if err := cl.Set(ctx, fmt.Sprintf("%s:%d", tag, i), i, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	var replica *Server
	for i, m := range c.Masters {
		if m == victim {
			replica = c.Replicas[i][0]
		}
	}
	// The writes reach the replica before the kill (asynchronous
	// replication; the test is about the takeover, not the window).
	if err := victim.Client(t).Do(ctx, "wait", 1, 5000).Err(); err != nil {
		t.Fatal(err)
	}
	victim.Kill(t)
	c.WaitStateOK(t)
	if now := c.MasterFor(t, tag); now != replica {
		t.Fatalf("after the kill %s serves the slot, want the replica %s", now.Addr, replica.Addr)
	}
	// The client learns the new map on its first errors (a lazy reload):
	// it may fail a few calls first.
	followed := time.Now()
	deadline := followed.Add(15 * time.Second)
	for cl.Get(ctx, tag+":0").Err() != nil {
		if time.Now().After(deadline) {
			t.Fatal("the cluster client did not find the new master within 15s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("the client followed %s after the cluster was ok again", time.Since(followed).Round(time.Millisecond))
	for i := 0; i < 20; i++ {
		v, err := cl.Get(ctx, fmt.Sprintf("%s:%d", tag, i)).Int()
		if err != nil || v != i {
			t.Fatalf("key %d after the failover: %v %v", i, v, err)
		}
	}

	// The old master comes back from its nodes.conf as a replica of the
	// node that took over, and catches up with it.
	victim.Revive(t)
	c.WaitStateOK(t)
	if now := c.MasterFor(t, tag); now != replica {
		t.Fatalf("after the revive %s serves the slot, want %s", now.Addr, replica.Addr)
	}
	vc := victim.Client(t)
	deadline = time.Now().Add(15 * time.Second)
	for {
		info, err := vc.Info(ctx, "replication").Result()
		if err == nil && strings.Contains(info, "role:slave") && strings.Contains(info, "master_link_status:up") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the revived master did not become an in-sync replica within 15s: %v\n%s", err, info)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
