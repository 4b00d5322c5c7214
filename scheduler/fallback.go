package scheduler

import (
	"context"
	"fmt"
)

// PointIdempotency makes an Idempotency-Key of group g name job id, which
// was admitted in another group (a model fallback) under the same key and
// body hash, unless the key already names a job there. A retry of the
// request is then answered by g's own admission with that job (replay),
// or refused as a conflict for another body, whichever group takes it
// now. The key lives as long as one written by admission.
func (s *Scheduler) PointIdempotency(ctx context.Context, g, tenant, user, key, id, bodyHash string) error {
	if key == "" {
		return nil
	}
	if err := s.rdb.SetNX(ctx, idempotencyKey(g, tenant, user, key), id+"|"+bodyHash, IdempotencyTTL).Err(); err != nil {
		return fmt.Errorf("scheduler: idempotency key of %s in %s: %w", id, g, err)
	}
	return nil
}
