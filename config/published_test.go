package config

import (
	"os"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// TestPublishedKeysCoverExample re-reads sluice.example.yaml and checks that
// every key written in it (plain or hashed, tenant or admin) is in
// publishedKeyDigests, so the list cannot drift from the file.
func TestPublishedKeysCoverExample(t *testing.T) {
	data, err := os.ReadFile("../sluice.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		AdminKeys []string `yaml:"admin_keys"`
		Tenants   []struct {
			Keys []string `yaml:"keys"`
		} `yaml:"tenants"`
	}
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	all := slices.Clone(doc.AdminKeys)
	for _, tn := range doc.Tenants {
		all = append(all, tn.Keys...)
	}
	if len(all) == 0 {
		t.Fatal("found no keys in sluice.example.yaml: has its layout changed?")
	}
	for _, s := range all {
		k, err := ParseKey(s)
		if err != nil {
			t.Fatalf("example key %q: %v", s, err)
		}
		if !k.IsPublished() {
			t.Errorf("sluice.example.yaml holds key %s (%q), which is not in publishedKeyDigests: add its digest", k, s)
		}
	}
	// The plain keys named in the list hash to their digests.
	for digest, plain := range publishedKeyDigests {
		if got := HashKey(plain); got != hashPrefix+digest {
			t.Errorf("publishedKeyDigests[%s] says %q, whose digest is %s", digest, plain, got)
		}
	}
}

func TestPublishedKeysPaths(t *testing.T) {
	c, err := Load("../sluice.example.yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"admin_keys[0]", "tenants[0].keys[0]", "tenants[1].keys[0]"}
	if got := c.PublishedKeys(); !slices.Equal(got, want) {
		t.Errorf("example file: PublishedKeys() = %v, want %v", got, want)
	}

	// An example key given through SLUICE_ADMIN_KEY is caught too, hashed or plain.
	doc := `tenants:
  - name: acme
    keys: ["acme-own-key-0123456789", "` + HashKey("example-research-key-0002") + `"]
model_groups:
  - name: g
    models: ["claude-*"]
    rpm: 5
    input_tpm: 100
    output_tpm: 100
`
	env := map[string]string{"SLUICE_ADMIN_KEY": "example-admin-key-0003"}
	c, err = Parse([]byte(doc), func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if got, want := c.PublishedKeys(), []string{"admin_keys[0]", "tenants[0].keys[1]"}; !slices.Equal(got, want) {
		t.Errorf("PublishedKeys() = %v, want %v", got, want)
	}

	// Own keys are not published.
	c, err = Parse([]byte(strings.Replace(doc, HashKey("example-research-key-0002"), HashKey("another-own-key-0123"), 1)), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.PublishedKeys(); len(got) != 0 {
		t.Errorf("own keys reported as published: %v", got)
	}
}
