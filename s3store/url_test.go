package s3store

import (
	"strings"
	"testing"
)

func TestParseURL(t *testing.T) {
	for _, env := range []string{"AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"} {
		t.Setenv(env, "")
	}
	tests := []struct {
		url    string
		env    map[string]string
		want   Config
		errHas string
	}{
		{url: "s3://cache", want: Config{Bucket: "cache", Endpoint: "s3.amazonaws.com", Secure: true}},
		{url: "s3://cache/nix/main/?region=eu-west-3", want: Config{Bucket: "cache", Prefix: "nix/main", Region: "eu-west-3", Endpoint: "s3.eu-west-3.amazonaws.com", Secure: true}},
		{url: "s3://cache?endpoint=127.0.0.1:8333&scheme=http", want: Config{Bucket: "cache", Endpoint: "127.0.0.1:8333"}},
		{url: "s3://cache/p?endpoint=http://garage.lan:3900&region=garage", want: Config{Bucket: "cache", Prefix: "p", Endpoint: "garage.lan:3900", Region: "garage"}},
		{url: "s3://cache?endpoint=https://minio.lan", want: Config{Bucket: "cache", Endpoint: "minio.lan", Secure: true}},
		{url: "s3://cache", env: map[string]string{"AWS_ENDPOINT_URL": "http://10.0.0.2:9000", "AWS_DEFAULT_REGION": "us-east-1"},
			want: Config{Bucket: "cache", Endpoint: "10.0.0.2:9000", Region: "us-east-1"}},
		{url: "s3://cache?endpoint=a:1", env: map[string]string{"AWS_ENDPOINT_URL_S3": "http://b:2", "AWS_ENDPOINT_URL": "http://c:3"},
			want: Config{Bucket: "cache", Endpoint: "a:1", Secure: true}},
		{url: "s3://cache", env: map[string]string{"AWS_ENDPOINT_URL_S3": "http://b:2", "AWS_ENDPOINT_URL": "http://c:3"},
			want: Config{Bucket: "cache", Endpoint: "b:2"}},
		{url: "s3://cache?profile=ci", want: Config{Bucket: "cache", Endpoint: "s3.amazonaws.com", Secure: true, Profile: "ci"}},
		{url: "/srv/cache", errHas: "want s3://BUCKET/PREFIX"},
		{url: "s3://", errHas: "no bucket"},
		{url: "s3://key:secret@cache", errHas: "keys do not go in the URL"},
		{url: "s3://cache?secret-key=x", errHas: `unknown parameter "secret-key"`},
		{url: "s3://cache?scheme=ftp", errHas: `scheme "ftp"`},
		{url: "s3://cache?endpoint=ftp://h", errHas: "want host[:port]"},
		{url: "s3://cache?endpoint=h/path", errHas: "want host[:port]"},
	}
	for _, tt := range tests {
		t.Run(tt.url, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			got, err := ParseURL(tt.url)
			if tt.errHas != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errHas) {
					t.Fatalf("ParseURL(%q) = %v, want an error with %q", tt.url, err, tt.errHas)
				}
				if strings.Contains(err.Error(), "secret") && tt.errHas == "keys do not go in the URL" {
					t.Fatalf("the error shows the secret: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Fatalf("ParseURL(%q) =\n %+v, want\n %+v", tt.url, got, tt.want)
			}
		})
	}
}

func TestConfigString(t *testing.T) {
	c := Config{Bucket: "b", Prefix: "p/q", Endpoint: "h:1", Region: "r", AccessKey: "AK", SecretKey: "SK"}
	s := c.String()
	if s != "s3://b/p/q?endpoint=http%3A%2F%2Fh%3A1&region=r" {
		t.Fatalf("String() = %s", s)
	}
	back, err := ParseURL(s)
	if err != nil || back.Endpoint != "h:1" || back.Secure || back.Prefix != "p/q" || back.Region != "r" {
		t.Fatalf("ParseURL(String()) = %+v, %v", back, err)
	}
}
