// The `postern` command: serve, account ..., queue ... . Every command takes --config like serve,
// so the CLI and a running server read the same store (safe: SQLite in WAL mode with a busy timeout).
import { Command, CommanderError } from 'commander';
import { ConfigError } from '../config/load-config.js';
import { registerAccountCommands } from './account-commands.js';
import { UsageError } from './cli-context.js';
import { registerQueueCommands } from './queue-commands.js';
import { registerSecurityCommands } from './security-commands.js';
import { registerServeCommand } from './serve-command.js';

export function buildProgram(): Command {
  const program = new Command('postern')
    .description('Postern: an SMTP relay for apps and devices')
    .version('0.1.0')
    .option('-c, --config <file>', 'configuration file (default: ./postern.toml when present, else built-in defaults)')
    .showHelpAfterError()
    .exitOverride();
  registerServeCommand(program);
  registerAccountCommands(program);
  registerQueueCommands(program);
  registerSecurityCommands(program);
  return program;
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return process.exitCode === undefined ? 0 : Number(process.exitCode);
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode;
    if (err instanceof ConfigError || err instanceof UsageError) {
      process.stderr.write(`postern: ${err.message}\n`);
      return 2;
    }
    process.stderr.write(`postern: ${(err as Error).message}\n`);
    return 1;
  }
}

// `serve` resolves only once the server has stopped (SIGTERM/SIGINT), so every command ends here.
process.exit(await main(process.argv));
