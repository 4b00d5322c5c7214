package tasks

import (
	"strings"
	"testing"
)

func TestFormatPayloadShowsNoContent(t *testing.T) {
	task, err := NewRunJob(RunJob{JobID: "job_abc", Group: "sonnet", Dispatch: 2}, RunJobOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := FormatPayload(task.Type(), task.Payload()), "job job_abc · group sonnet · dispatch 2"; got != want {
		t.Errorf("run job payload shown as %q, want %q", got, want)
	}
	secret := []byte(`{"messages":[{"role":"user","content":"my private prompt"}]}`)
	for _, typ := range []string{"job:other", TypeRunJob} {
		if got := FormatPayload(typ, secret); strings.Contains(got, "private") || !strings.Contains(got, "not shown") {
			t.Errorf("%s payload shown as %q", typ, got)
		}
	}
	if got := FormatResult(TypeRunJob, []byte("my private answer")); strings.Contains(got, "private") {
		t.Errorf("result shown as %q", got)
	}
}
