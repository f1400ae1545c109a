import Foundation
import OCI
import Testing

#if canImport(Glibc)
import Glibc
#endif

// The CI recipes of docs/ci/ run here, so that they cannot rot: every `run:` step of the GitHub
// Actions workflow and every before_script/script/after_script line of the GitLab jobs, as the
// platform would run them (one bash per GitHub step, with $GITHUB_ENV and $GITHUB_PATH carried
// to the next; one bash for GitLab's before_script and script, another for after_script),
// against the local docker-registry and moto's S3 server.
//
// Left out is only the platform's own plumbing: `uses:` steps (checkout, setup-buildx, the
// registry login, the AWS credentials action), whose effect the test provides (a checkout
// with a Dockerfile, ~/.docker/config.json, AWS_* keys), the `${{ }}` expressions and GitLab's
// variables, which the test evaluates with values pointing at the local servers, and the job
// images and services. Where a recipe names a real service, the test says what stands for it:
// the registry host becomes the local registry, and `endpoint_url=…,use_path_style=true`
// (moto) is appended to an S3 source; every other byte of the recipes' commands runs as
// written.
//
// BuildKit is not installed here or in CI, so THE BUILD ITSELF IS STOOD IN FOR:
// scripts/testenv/buildkit_standin.py is put on PATH as `docker` and `buildctl`. It performs
// on the cache directory exactly the file operations BuildKit's local cache importer and
// exporter perform (shared/reference/buildkit-cache.md sections 2-4b), reads the cached
// layers whole through the mount and checks their digests, and reports what it found.
//
// Each recipe job runs twice, as two CI runs on fresh runners (new temporary directory, new
// content cache): the first finds no cache, builds and exports, and its unmount publishes the
// tag, which the test then reads from the remote; the second imports that cache, has every
// step cached, reads every layer from the remote through the mount, and exports only a new
// cache config and manifest, which become the remote's tag.

/// A recipe file, parsed by PyYAML (installed with moto) into JSON objects.
enum RecipeFile {
    static let directory = Harness.packageRoot + "/docs/ci"

    static func load(_ name: String, python: String, in ws: Workspace) async throws -> [String: Any] {
        let path = directory + "/" + name
        let result = try await Processes.run(python, ["-c", """
            import json, sys, yaml
            print(json.dumps(yaml.safe_load(open(sys.argv[1]))))
            """, path], timeout: 30, in: ws)
        guard result.status == 0 else {
            throw HarnessError("cannot parse \(path) with PyYAML (python3 -m pip install pyyaml): \(result)")
        }
        guard let object = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any] else {
            throw HarnessError("\(path) is not a YAML mapping")
        }
        return object
    }
}

/// What one run of the stand-in reported (one JSON line in $BUILDKIT_STANDIN_REPORT).
struct StandInReport: Decodable {
    struct Import: Decodable {
        var src: String
        var tag: String
        var manifest: String?
        var layersRead: [String]
    }

    struct Export: Decodable {
        var dest: String
        var tag: String
        var manifest: String
        var config: String
        var written: [String]
    }

    struct Step: Decodable {
        var instruction: String
        var cached: Bool
        var layer: String?
    }

    var tool: String
    var imports: [Import]
    var exports: [Export]
    var steps: [Step]

    var layers: [String] { steps.compactMap(\.layer) }

    static func read(_ path: String) throws -> [StandInReport] {
        try Processes.readText(path).split(separator: "\n").map { try JSONDecoder().decode(StandInReport.self, from: Data($0.utf8)) }
    }
}

/// One CI machine: the environment a fresh runner gives a job, the stand-ins on PATH, a
/// checkout holding a Dockerfile, and a temporary directory of its own.
struct Runner {
    let python: String
    let standIns: String
    let checkout: String
    let temporary: String
    let home: String
    let report: String

    static let dockerfile = """
        FROM debian:12-slim
        RUN apt-get update && apt-get install -y --no-install-recommends build-essential
        COPY . /src
        RUN make -C /src
        """

    /// A fresh runner in `ws` (nothing of an earlier one is visible to it).
    static func fresh(_ label: String, python: String, in ws: Workspace) throws -> Runner {
        let root = try ws.makeDirectory("runner-\(label)-\(ws.nextID())")
        let runner = Runner(python: python, standIns: root + "/standins", checkout: root + "/checkout", temporary: root + "/tmp",
                            home: root + "/home", report: root + "/buildkit-report.jsonl")
        for directory in [runner.standIns, runner.checkout, runner.temporary, runner.home] {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        }
        try Data(dockerfile.utf8).write(to: URL(fileURLWithPath: runner.checkout + "/Dockerfile"))
        let standIn = Harness.testenv + "/buildkit_standin.py"
        guard FileManager.default.fileExists(atPath: standIn) else { throw HarnessError("test environment script missing: \(standIn)") }
        for tool in ["docker", "buildctl"] {
            let wrapper = runner.standIns + "/" + tool
            try Data("#!/bin/sh\nBUILDKIT_STANDIN_TOOL=\(tool) exec '\(python)' '\(standIn)' \"$@\"\n".utf8)
                .write(to: URL(fileURLWithPath: wrapper))
            guard chmod(wrapper, 0o755) == 0 else { throw SysError(call: "chmod", path: wrapper, code: errno) }
        }
        return runner
    }

    /// What every job starts with: a clean environment (`env -i`), as on a fresh runner.
    var baseEnvironment: [String: String] {
        ["PATH": standIns + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": home, "TMPDIR": temporary,
         "LANG": "C.UTF-8", "BUILDKIT_STANDIN_REPORT": report, "AWS_EC2_METADATA_DISABLED": "true"]
    }

    /// Runs `script` with bash as `shellArguments` say, in the checkout, with exactly `environment`.
    func shell(_ script: String, _ shellArguments: [String], environment: [String: String], label: String,
               in ws: Workspace) async throws -> ProcessResult {
        let file = ws.path("\(label)-\(ws.nextID()).sh")
        try Data(("cd \(Self.quoted(checkout))\n" + script).utf8).write(to: URL(fileURLWithPath: file))
        let assignments = environment.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
        return try await Processes.run("/usr/bin/env", ["-i"] + assignments + ["/bin/bash"] + shellArguments + [file],
                                       timeout: 600, in: ws)
    }

    static func quoted(_ text: String) -> String { "'" + text.replacingOccurrences(of: "'", with: "'\\''") + "'" }

    func reports() throws -> [StandInReport] { try StandInReport.read(report) }
}

/// Runs the `run:` steps of one GitHub Actions job as the runner does.
struct GitHubActionsJob {
    /// Expression contexts (`vars`, `github`, `secrets`): `${{ vars.X }}` and the like.
    var contexts: [String: [String: String]]
    /// Values the test gives the workflow's or job's `env:` keys in place of the recipe's
    /// (a real host the test cannot reach). Each must name a key the recipe has.
    var envOverrides: [String: String] = [:]
    /// Applied to the evaluated `env:` values (e.g. the S3 endpoint appended).
    var envTransforms: [String: (String) -> String] = [:]
    /// What the `uses:` steps would have exported (e.g. configure-aws-credentials' keys).
    var plumbingEnvironment: [String: String] = [:]

    struct StepRun {
        var name: String
        var result: ProcessResult?
        var skipped: Bool { result == nil }
    }

    func evaluate(_ text: String) throws -> String {
        var output = ""
        var rest = Substring(text)
        while let open = rest.range(of: "${{") {
            output += rest[..<open.lowerBound]
            guard let close = rest[open.upperBound...].range(of: "}}") else { throw HarnessError("unclosed ${{ in \(text)") }
            let expression = rest[open.upperBound..<close.lowerBound].trimmingCharacters(in: .whitespaces)
            let parts = expression.split(separator: ".", maxSplits: 1).map(String.init)
            guard parts.count == 2, let value = contexts[parts[0]]?[parts[1]] else {
                throw HarnessError("the recipe uses ${{ \(expression) }}, which the test does not provide")
            }
            output += value
            rest = rest[close.upperBound...]
        }
        return output + rest
    }

    /// Runs the job's steps in order; returns each step's outcome. A step's failure does not
    /// stop the job (later `if: always()` / `failure()` steps run, as on GitHub).
    func run(_ workflow: [String: Any], job name: String, on runner: Runner, in ws: Workspace) async throws -> [StepRun] {
        guard let jobs = workflow["jobs"] as? [String: Any], let job = jobs[name] as? [String: Any],
              let steps = job["steps"] as? [[String: Any]] else {
            throw HarnessError("docs/ci/github-actions.yml has no job \(name) with steps")
        }
        var env: [String: String] = [:]
        for scope in [workflow["env"], job["env"]] {
            for (key, value) in scope as? [String: Any] ?? [:] { env[key] = try evaluate("\(value)") }
        }
        for (key, value) in envOverrides {
            guard env[key] != nil else { throw HarnessError("the recipe has no env key \(key) for the test to point at the local servers") }
            env[key] = value
        }
        for (key, transform) in envTransforms {
            guard let value = env[key] else { throw HarnessError("the recipe has no env key \(key)") }
            env[key] = transform(value)
        }
        let githubEnv = runner.temporary + "/github-env", githubPath = runner.temporary + "/github-path"
        _ = FileManager.default.createFile(atPath: githubEnv, contents: nil)
        _ = FileManager.default.createFile(atPath: githubPath, contents: nil)
        var runnerEnvironment = runner.baseEnvironment.merging(plumbingEnvironment) { _, new in new }
        runnerEnvironment.merge(["CI": "true", "GITHUB_ACTIONS": "true", "RUNNER_TEMP": runner.temporary,
                                 "GITHUB_WORKSPACE": runner.checkout, "GITHUB_ENV": githubEnv, "GITHUB_PATH": githubPath,
                                 "GITHUB_REPOSITORY": contexts["github"]?["repository"] ?? "",
                                 "GITHUB_REF_NAME": contexts["github"]?["ref_name"] ?? ""]) { _, new in new }

        var outcomes: [StepRun] = []
        var failed = false
        for (number, step) in steps.enumerated() {
            let stepName = step["name"] as? String ?? step["uses"] as? String ?? "step \(number + 1)"
            let known: Set = ["name", "uses", "with", "run", "if", "env", "id"]
            guard Set(step.keys).isSubset(of: known) else {
                throw HarnessError("step \(stepName) has keys the test does not emulate: \(Set(step.keys).subtracting(known).sorted())")
            }
            guard let script = step["run"] as? String else { continue }  // `uses:`: plumbing the test provided
            guard !script.contains("${{") else {
                throw HarnessError("step \(stepName) expands ${{ }} inside its script; pass it through env: instead")
            }
            let condition = (step["if"] as? String)?.trimmingCharacters(in: .whitespaces)
            let runs: Bool
            switch condition {
            case nil: runs = !failed
            case "always()": runs = true
            case "failure()": runs = failed
            default: throw HarnessError("step \(stepName): the test does not evaluate `if: \(condition ?? "")`")
            }
            guard runs else {
                outcomes.append(StepRun(name: stepName, result: nil))
                continue
            }
            var environment = runnerEnvironment.merging(env) { _, new in new }
            for (key, value) in step["env"] as? [String: Any] ?? [:] { environment[key] = try evaluate("\(value)") }
            for line in Processes.readText(githubEnv).split(separator: "\n") {
                let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
                guard parts.count == 2 else { throw HarnessError("$GITHUB_ENV line the test does not understand: \(line)") }
                environment[parts[0]] = parts[1]
            }
            let added = Processes.readText(githubPath).split(separator: "\n").map(String.init).reversed()
            environment["PATH"] = (added + [environment["PATH"] ?? ""]).joined(separator: ":")
            let result = try await runner.shell(script, ["--noprofile", "--norc", "-eo", "pipefail"], environment: environment,
                                                label: "gha-\(name)-\(number)", in: ws)
            if result.status != 0 { failed = true }
            outcomes.append(StepRun(name: stepName, result: result))
        }
        return outcomes
    }
}

/// Runs one GitLab CI job's before_script + script in one bash, after_script in another.
struct GitLabJob {
    /// GitLab's predefined variables and the project's CI/CD variables (which take precedence
    /// over the file's, as in GitLab).
    var predefined: [String: String]
    var projectVariables: [String: String] = [:]
    /// Applied to the expanded variables (e.g. the S3 endpoint appended to a source).
    var variableTransforms: [String: (String) -> String] = [:]
    /// Values of the job's `id_tokens:` (GitLab's OIDC tokens).
    var idTokens: [String: String] = [:]

    struct Outcome {
        var script: ProcessResult
        var afterScript: ProcessResult
    }

    /// `extends:`: the template's hashes merged deeply under the job's, other values replaced.
    static func merged(_ base: [String: Any], _ over: [String: Any]) -> [String: Any] {
        var result = base
        for (key, value) in over {
            if let inner = value as? [String: Any], let existing = result[key] as? [String: Any] {
                result[key] = merged(existing, inner)
            } else {
                result[key] = value
            }
        }
        return result
    }

    /// GitLab expands `$NAME` and `${NAME}` in variables' values before the shell sees them.
    static func expand(_ text: String, with variables: [String: String]) -> String {
        var output = ""
        var index = text.startIndex
        while index < text.endIndex {
            guard text[index] == "$" else {
                output.append(text[index])
                index = text.index(after: index)
                continue
            }
            var cursor = text.index(after: index)
            let braced = cursor < text.endIndex && text[cursor] == "{"
            if braced { cursor = text.index(after: cursor) }
            let start = cursor
            while cursor < text.endIndex, text[cursor].isLetter || text[cursor].isNumber || text[cursor] == "_" {
                cursor = text.index(after: cursor)
            }
            let name = String(text[start..<cursor])
            if braced, cursor < text.endIndex, text[cursor] == "}" { cursor = text.index(after: cursor) }
            output += name.isEmpty ? "$" : variables[name] ?? ""
            index = name.isEmpty ? text.index(after: index) : cursor
        }
        return output
    }

    func run(_ file: [String: Any], job name: String, on runner: Runner, in ws: Workspace) async throws -> Outcome {
        guard var job = file[name] as? [String: Any] else { throw HarnessError("docs/ci/gitlab-ci.yml has no job \(name)") }
        if let parent = job["extends"] as? String {
            guard let template = file[parent] as? [String: Any] else { throw HarnessError("\(name) extends \(parent), which is missing") }
            job = Self.merged(template, job)
        }
        let known: Set = ["extends", "image", "services", "variables", "before_script", "script", "after_script", "id_tokens"]
        guard Set(job.keys).isSubset(of: known) else {
            throw HarnessError("job \(name) has keys the test does not emulate: \(Set(job.keys).subtracting(known).sorted())")
        }
        var variables = predefined
        for (key, value) in (job["variables"] as? [String: Any] ?? [:]).sorted(by: { $0.key < $1.key }) {
            variables[key] = Self.expand("\(value)", with: variables.merging(projectVariables) { _, new in new })
        }
        variables.merge(projectVariables) { _, new in new }
        for (key, transform) in variableTransforms {
            guard let value = variables[key] else { throw HarnessError("job \(name) has no variable \(key)") }
            variables[key] = transform(value)
        }
        for key in (job["id_tokens"] as? [String: Any] ?? [:]).keys {
            guard let token = idTokens[key] else { throw HarnessError("job \(name) asks for id token \(key), which the test does not provide") }
            variables[key] = token
        }
        func lines(_ key: String) throws -> [String] {
            guard let value = job[key] else { return [] }
            guard let lines = value as? [String] else { throw HarnessError("\(name).\(key) is not a list of strings") }
            return lines
        }
        let environment = runner.baseEnvironment.merging(variables) { _, new in new }
            .merging(["CI": "true", "GITLAB_CI": "true", "CI_PROJECT_DIR": runner.checkout]) { _, new in new }
        let script = try (lines("before_script") + lines("script")).joined(separator: "\n")
        let scriptResult = try await runner.shell(script, ["-eo", "pipefail"], environment: environment, label: "gitlab-\(name)", in: ws)
        var afterEnvironment = environment
        afterEnvironment["CI_JOB_STATUS"] = scriptResult.status == 0 ? "success" : "failed"
        let after = try await runner.shell(try lines("after_script").joined(separator: "\n"), ["-eo", "pipefail"],
                                           environment: afterEnvironment, label: "gitlab-\(name)-after", in: ws)
        return Outcome(script: scriptResult, afterScript: after)
    }
}

/// What both CI runs of a recipe must show; shared by the four jobs.
enum RecipeCheck {
    /// The first run: no cache yet, every step built and every blob exported through the mount.
    static func firstRun(_ reports: [StandInReport], tag: String) throws -> StandInReport.Export {
        #expect(reports.count == 1, "one build: \(reports.count)")
        let report = try #require(reports.first)
        let found = try #require(report.imports.first, "the build imported from the mount")
        #expect(found.tag == tag && found.manifest == nil && found.layersRead.isEmpty, "nothing to import on the first run: \(found)")
        #expect(report.steps.allSatisfy { !$0.cached }, "the first run builds every step: \(report.steps)")
        let export = try #require(report.exports.first, "the build exported into the mount")
        #expect(export.tag == tag)
        #expect(Set(export.written) == Set(report.layers + [export.config, export.manifest]),
                "every layer, the cache config and the manifest were written: \(export.written)")
        return export
    }

    /// The second run, on a fresh runner: every step cached, every layer read through the
    /// mount (and digest-checked by the stand-in), and only a new config and manifest written.
    static func secondRun(_ reports: [StandInReport], after first: StandInReport, tag: String) throws -> StandInReport.Export {
        #expect(reports.count == 1, "one build: \(reports.count)")
        let report = try #require(reports.first)
        let found = try #require(report.imports.first)
        #expect(found.manifest != nil, "the second run found tag \(tag) in the mount")
        #expect(report.steps.allSatisfy { $0.cached }, "every step cached on the second run: \(report.steps)")
        #expect(found.layersRead == first.layers, "every layer was read, base first: \(found.layersRead) vs \(first.layers)")
        let export = try #require(report.exports.first)
        #expect(Set(export.written) == Set([export.config, export.manifest]),
                "a re-export writes only the new cache config and manifest: \(export.written)")
        return export
    }

    static func stepsPassed(_ steps: [GitHubActionsJob.StepRun]) {
        for step in steps where step.name != "ocicachefs log" {
            guard let result = step.result else {
                Issue.record("step \(step.name) did not run")
                continue
            }
            #expect(result.status == 0, "step \(step.name) failed: \(result)")
        }
        #expect(steps.first { $0.name == "ocicachefs log" }?.skipped == true, "the failure-only step was skipped")
    }

    /// The registry's tag, read back over HTTP: the manifest the build exported.
    static func registryTag(_ registry: Registry, repo: String, tag: String, user: String, password: String) throws -> String {
        let credentials = Data("\(user):\(password)".utf8).base64EncodedString()
        let answer = try #require(RawHTTP.get(port: registry.port, path: "/v2/\(repo)/manifests/\(tag)", headers: [
            "Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
            "Authorization": "Basic \(credentials)",
        ]), "the registry answered")
        #expect(answer.status == 200, "GET manifests/\(tag): \(answer.status) \(answer.head)")
        for line in answer.head.split(separator: "\r\n") where line.lowercased().hasPrefix("docker-content-digest:") {
            return line.split(separator: ":", maxSplits: 1)[1].trimmingCharacters(in: .whitespaces)
        }
        throw HarnessError("no Docker-Content-Digest in \(answer.head)")
    }

    /// The S3 tag, read back from moto: BuildKit's S3 manifest object naming every layer.
    static func s3Tag(_ moto: MotoS3, bucket: String, name: String, layers: [String], in ws: Workspace) async throws {
        let key = "manifests/\(name)"
        let objects = try await moto.objects(bucket: bucket, keys: [key], in: ws)
        let object = String(decoding: try #require(objects[key], "s3://\(bucket)/\(key) was published"), as: UTF8.self)
        for layer in layers { #expect(object.contains(layer), "\(key) names layer \(layer)") }
    }

    /// The release binary as a recipe downloads it: a file:// URL and its sha256.
    static func binaryVariables() throws -> [String: String] {
        let binary = try Harness.binary()
        let hex = try FileIO.digest(binary).digest.replacingOccurrences(of: "sha256:", with: "")
        return ["OCICACHEFS_URL": "file://" + binary, "OCICACHEFS_SHA256": hex]
    }

    /// The interpreter itself, not a pyenv shim (the jobs run with a HOME of their own).
    static func python(in ws: Workspace) async throws -> String {
        let result = try await Processes.run(try Harness.python(), ["-c", "import sys; print(sys.executable)"], timeout: 30, in: ws)
        let path = result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        guard result.status == 0, FileManager.default.isExecutableFile(atPath: path) else { throw HarnessError("python3: \(result)") }
        return path
    }

    /// Whatever a job left mounted under the workspace is unmounted at the end, and no mount
    /// may outlive a job that unmounted.
    static func noMountLeft(_ ws: Workspace, after job: String) {
        let left = Mounts.all().filter { $0.hasPrefix(ws.dir + "/") }
        #expect(left.isEmpty, "\(job) left mounts behind: \(left)")
        for mountpoint in left { ws.forceUnmount(mountpoint) }
    }
}

@Suite("The CI recipes in docs/ci run (the build is stood in for)", .serialized)
struct RecipeTests {
    static let user = "ci-bot", password = "registry-token"

    @Test("GitHub Actions, registry job: install, mount, buildx with the cache, stats, unmount publishes; the next run has every step cached")
    func gitHubActionsRegistry() async throws {
        try await withWorkspace("recipe-gha-registry") { ws in
            try Harness.requireFuse()
            ws.onCleanup("recipe mounts") { RecipeCheck.noMountLeft(ws, after: "cleanup") }
            let python = try await RecipeCheck.python(in: ws)
            let registry = try await ws.startRegistry(auth: .basic(user: Self.user, password: Self.password))
            let workflow = try await RecipeFile.load("github-actions.yml", python: python, in: ws)
            let binary = try RecipeCheck.binaryVariables()
            let job = GitHubActionsJob(
                contexts: ["vars": binary, "github": ["repository": "Example/App", "ref_name": "main", "actor": Self.user],
                           "secrets": ["GITHUB_TOKEN": Self.password]],
                envOverrides: ["REGISTRY": registry.host])

            var exports: [StandInReport.Export] = []
            var first: StandInReport?
            for run in 1...2 {
                let runner = try Runner.fresh("gha-registry-\(run)", python: python, in: ws)
                // docker/login-action's effect: ~/.docker/config.json with the registry's login.
                let login = try ws.dockerConfig(host: registry.host, user: Self.user, password: Self.password)
                try FileManager.default.copyItem(atPath: login, toPath: runner.home + "/.docker")
                let steps = try await job.run(workflow, job: "registry-cache", on: runner, in: ws)
                RecipeCheck.stepsPassed(steps)
                RecipeCheck.noMountLeft(ws, after: "run \(run)")
                let reports = try runner.reports()
                if run == 1 {
                    exports.append(try RecipeCheck.firstRun(reports, tag: "buildcache"))
                    first = reports.first
                    let stats = try #require(steps.first { $0.name == "Cache statistics" }?.result)
                    #expect(!stats.stdout.isEmpty, "ocicachefs stats printed the mount's figures")
                } else {
                    exports.append(try RecipeCheck.secondRun(reports, after: try #require(first), tag: "buildcache"))
                    for layer in try #require(first).layers {
                        #expect(registry.blobGets(repo: "example/app", digest: layer) >= 1,
                                "layer \(layer) came from the registry through the mount")
                    }
                }
                let published = try RecipeCheck.registryTag(registry, repo: "example/app", tag: "buildcache",
                                                             user: Self.user, password: Self.password)
                #expect(published == exports[run - 1].manifest, "run \(run): the registry's tag is the manifest the build exported")
            }
        }
    }

    @Test("GitHub Actions, S3 job: the AWS keys the credentials action exports, the mount, buildx, unmount publishes; the next run has every step cached")
    func gitHubActionsS3() async throws {
        try await withS3Workspace("recipe-gha-s3") { ws in
            ws.onCleanup("recipe mounts") { RecipeCheck.noMountLeft(ws, after: "cleanup") }
            let python = try await RecipeCheck.python(in: ws)
            let moto = try await ws.startMoto()
            let bucket = "gha-build-cache"
            try await moto.createBucket(bucket, in: ws)
            let workflow = try await RecipeFile.load("github-actions.yml", python: python, in: ws)
            let endpoint = moto.endpoint
            let job = GitHubActionsJob(
                contexts: ["vars": try RecipeCheck.binaryVariables().merging(
                    ["CACHE_BUCKET": bucket, "CACHE_REGION": "us-east-1", "CACHE_ROLE_ARN": "arn:aws:iam::123456789012:role/ci"]) { _, new in new },
                           "github": ["repository": "example/app", "ref_name": "main"]],
                envTransforms: ["CACHE_SOURCE": { $0 + ",endpoint_url=\(endpoint),use_path_style=true" }],
                // aws-actions/configure-aws-credentials' effect.
                plumbingEnvironment: ["AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                                      "AWS_SESSION_TOKEN": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"])

            var first: StandInReport?
            var published: [[UInt8]] = []
            for run in 1...2 {
                let runner = try Runner.fresh("gha-s3-\(run)", python: python, in: ws)
                let steps = try await job.run(workflow, job: "s3-cache", on: runner, in: ws)
                RecipeCheck.stepsPassed(steps)
                RecipeCheck.noMountLeft(ws, after: "run \(run)")
                let reports = try runner.reports()
                if run == 1 {
                    _ = try RecipeCheck.firstRun(reports, tag: "buildcache")
                    first = reports.first
                } else {
                    _ = try RecipeCheck.secondRun(reports, after: try #require(first), tag: "buildcache")
                }
                try await RecipeCheck.s3Tag(moto, bucket: bucket, name: "buildcache", layers: try #require(first).layers, in: ws)
                let objects = try await moto.objects(bucket: bucket, keys: ["manifests/buildcache"], in: ws)
                published.append(objects["manifests/buildcache"] ?? [])
            }
            #expect(published.count == 2 && published[0] != published[1],
                    "the second run's cache config replaced the first's manifest object")
        }
    }

    @Test("GitLab CI, registry job: the CI_REGISTRY login written for ocicachefs, buildctl with the cache, unmount publishes; the next run has every step cached")
    func gitLabRegistry() async throws {
        try await withWorkspace("recipe-gitlab-registry") { ws in
            try Harness.requireFuse()
            ws.onCleanup("recipe mounts") { RecipeCheck.noMountLeft(ws, after: "cleanup") }
            let python = try await RecipeCheck.python(in: ws)
            let registry = try await ws.startRegistry(auth: .basic(user: Self.user, password: Self.password))
            let file = try await RecipeFile.load("gitlab-ci.yml", python: python, in: ws)

            var first: StandInReport?
            for run in 1...2 {
                let runner = try Runner.fresh("gitlab-registry-\(run)", python: python, in: ws)
                let job = GitLabJob(
                    predefined: ["CI_JOB_ID": "\(1000 + run)", "CI_REGISTRY": registry.host, "CI_REGISTRY_IMAGE": registry.host + "/group/app",
                                 "CI_REGISTRY_USER": Self.user, "CI_REGISTRY_PASSWORD": Self.password, "CI_COMMIT_SHORT_SHA": "0123abcd"],
                    // The runner's volume for the content cache: one per runner here (fresh runners).
                    projectVariables: try RecipeCheck.binaryVariables().merging(["OCICACHEFS_CACHE_DIR": runner.temporary + "/content-cache"]) { _, new in new })
                let outcome = try await job.run(file, job: "build-registry-cache", on: runner, in: ws)
                #expect(outcome.script.status == 0, "script: \(outcome.script)")
                #expect(outcome.afterScript.status == 0, "after_script: \(outcome.afterScript)")
                #expect(!outcome.afterScript.stdout.contains("ocicachefs"), "a successful job prints no log: \(outcome.afterScript.stdout.prefix(500))")
                RecipeCheck.noMountLeft(ws, after: "run \(run)")
                let reports = try runner.reports()
                let export: StandInReport.Export
                if run == 1 {
                    export = try RecipeCheck.firstRun(reports, tag: "main")
                    first = reports.first
                } else {
                    export = try RecipeCheck.secondRun(reports, after: try #require(first), tag: "main")
                    for layer in try #require(first).layers {
                        #expect(registry.blobGets(repo: "group/app/buildcache", digest: layer) >= 1,
                                "layer \(layer) came from the registry through the mount")
                    }
                }
                let published = try RecipeCheck.registryTag(registry, repo: "group/app/buildcache", tag: "main",
                                                             user: Self.user, password: Self.password)
                #expect(published == export.manifest, "run \(run): the registry's tag is the manifest the build exported")
            }
        }
    }

    @Test("GitLab CI, S3 job: the id token exchanged with STS (web identity, moto), buildctl with the cache, unmount publishes; the next run has every step cached")
    func gitLabS3WebIdentity() async throws {
        try await withS3Workspace("recipe-gitlab-s3") { ws in
            ws.onCleanup("recipe mounts") { RecipeCheck.noMountLeft(ws, after: "cleanup") }
            let python = try await RecipeCheck.python(in: ws)
            let moto = try await ws.startMoto()
            let bucket = "gitlab-build-cache"
            try await moto.createBucket(bucket, in: ws)
            let file = try await RecipeFile.load("gitlab-ci.yml", python: python, in: ws)
            let endpoint = moto.endpoint

            var first: StandInReport?
            for run in 1...2 {
                let runner = try Runner.fresh("gitlab-s3-\(run)", python: python, in: ws)
                let job = GitLabJob(
                    predefined: ["CI_JOB_ID": "\(2000 + run)", "CI_COMMIT_SHORT_SHA": "0123abcd",
                                 // STS at the local moto, in place of sts.REGION.amazonaws.com.
                                 "AWS_ENDPOINT_URL_STS": endpoint],
                    projectVariables: try RecipeCheck.binaryVariables().merging(
                        ["OCICACHEFS_CACHE_DIR": runner.temporary + "/content-cache", "CACHE_BUCKET": bucket, "CACHE_REGION": "us-east-1",
                         "CACHE_ROLE_ARN": "arn:aws:iam::123456789012:role/gitlab-cache"]) { _, new in new },
                    variableTransforms: ["CACHE_SOURCE": { $0 + ",endpoint_url=\(endpoint),use_path_style=true" }],
                    idTokens: ["CACHE_OIDC_TOKEN": "eyJhbGciOiJSUzI1NiJ9.gitlab-oidc-\(run).signature"])
                let stsBefore = moto.requests().filter { $0.method == "POST" && $0.path == "/" }.count
                let outcome = try await job.run(file, job: "build-s3-cache", on: runner, in: ws)
                #expect(outcome.script.status == 0, "script: \(outcome.script)")
                #expect(outcome.afterScript.status == 0, "after_script: \(outcome.afterScript)")
                RecipeCheck.noMountLeft(ws, after: "run \(run)")
                let stsCalls = moto.requests().filter { $0.method == "POST" && $0.path == "/" }.dropFirst(stsBefore)
                #expect(!stsCalls.isEmpty && stsCalls.allSatisfy { $0.status == 200 },
                        "run \(run): the mount exchanged the id token with STS: \(Array(stsCalls))")
                let reports = try runner.reports()
                if run == 1 {
                    _ = try RecipeCheck.firstRun(reports, tag: "main")
                    first = reports.first
                } else {
                    _ = try RecipeCheck.secondRun(reports, after: try #require(first), tag: "main")
                }
                try await RecipeCheck.s3Tag(moto, bucket: bucket, name: "main", layers: try #require(first).layers, in: ws)
            }
        }
    }
}
