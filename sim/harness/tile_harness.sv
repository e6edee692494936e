`timescale 1ns/1ps
// tw_tile_harness: Verilator test harness around one generated compute tile (`tw_tile`).
//
// The clock is generated here (a 10 ns period), so the simulator runs free between commands
// and Python (cocotb, tilewright.sim.tile_tb) only waits for `cmd_done`. Memory images move
// in bulk through files: $readmemh into a local array, then one word per cycle into the
// tile's write ports; dumps read one word per cycle and end with $writememh.
//
// Files of job N live in "<TW_DIR>/jobN/" (plusarg +TW_DIR=..., default "."):
//   pm.hex      PMEM_WORDS lines of 16 hex digits (the program, zero-padded to the memory size)
//   dm.hex      DMEM_WORDS lines of WORD_BITS/4 hex digits (the data memory image)
//   dm_out.hex  written by DUMP_DM, same format as dm.hex
//
// Command handshake (four-phase): set `cmd`, `job` (and `timeout_cycles` for START), raise
// `cmd_valid`; the harness raises `cmd_done` when the command has finished; lower `cmd_valid`;
// the harness lowers `cmd_done` and accepts the next command.
//   1 LOAD_PM  stream jobN/pm.hex into the whole program memory (PMEM_WORDS cycles)
//   2 LOAD_DM  stream jobN/dm.hex into the whole data memory (DMEM_WORDS cycles)
//   3 START    pulse `start`, wait until `done` rises (or `timeout_cycles` pass: `timed_out`)
//   4 DUMP_DM  read the whole data memory (DMEM_WORDS + 3 cycles), write jobN/dm_out.hex
//   5 RESET    hold the tile's `rst` for 4 cycles (after a timeout)
// Any other command ends at once with `bad_cmd` set.
//
// The tile contract: `dm_rdata` is valid the cycle after `dm_re`; the harness accesses memory
// only while the tile is not busy (then `dm_ready` is always high); `done` stays high after
// HALT or an error until the next start.
module tw_tile_harness #(
    parameter int PMEM_WORDS = 2048,
    parameter int PC_BITS    = 11,
    parameter int DMEM_WORDS = 8192,
    parameter int ADDR_BITS  = 13,
    parameter int WORD_BITS  = 64
) (
    input  logic [2:0]         cmd            /*verilator public_flat_rw*/,
    input  logic               cmd_valid      /*verilator public_flat_rw*/,
    input  logic [31:0]        job            /*verilator public_flat_rw*/,
    input  logic [31:0]        timeout_cycles /*verilator public_flat_rw*/,
    output logic               cmd_done       /*verilator public_flat_rw*/,
    output logic               bad_cmd        /*verilator public_flat_rw*/,
    output logic               timed_out      /*verilator public_flat_rw*/,
    output logic [31:0]        run_cycles     /*verilator public_flat_rw*/,
    output logic               busy           /*verilator public_flat_rw*/,
    output logic               done           /*verilator public_flat_rw*/,
    output logic               error          /*verilator public_flat_rw*/,
    output logic [7:0]         error_code     /*verilator public_flat_rw*/,
    output logic [PC_BITS-1:0] error_pc       /*verilator public_flat_rw*/,
    output logic [31:0]        cycles         /*verilator public_flat_rw*/
);
    localparam logic [2:0] CMD_LOAD_PM = 3'd1;
    localparam logic [2:0] CMD_LOAD_DM = 3'd2;
    localparam logic [2:0] CMD_START   = 3'd3;
    localparam logic [2:0] CMD_DUMP_DM = 3'd4;
    localparam logic [2:0] CMD_RESET   = 3'd5;

    typedef enum logic [3:0] {
        S_RESET, S_IDLE, S_LOAD_PM, S_LOAD_DM, S_DUMP, S_DUMP_DRAIN, S_START, S_RUN, S_ACK
    } state_t;

    logic clk = 1'b0;
    always #5 clk = ~clk;

    // Tile ports driven by the harness.
    logic                 rst = 1'b1;
    logic                 start = 1'b0;
    logic                 pm_we = 1'b0;
    logic [PC_BITS-1:0]   pm_addr = '0;
    logic [63:0]          pm_wdata = '0;
    logic                 dm_we = 1'b0;
    logic                 dm_re = 1'b0;
    logic [ADDR_BITS-1:0] dm_addr = '0;
    logic [WORD_BITS-1:0] dm_wdata = '0;
    logic [WORD_BITS-1:0] dm_rdata;

    tw_tile tile (
        .clk(clk), .rst(rst),
        .start(start), .busy(busy), .done(done), .error(error), .error_code(error_code),
        .error_pc(error_pc), .cycles(cycles),
        .pm_we(pm_we), .pm_addr(pm_addr), .pm_wdata(pm_wdata),
        .dm_we(dm_we), .dm_re(dm_re), .dm_addr(dm_addr), .dm_wdata(dm_wdata),
        .dm_rdata(dm_rdata), .dm_ready(dm_ready),
        .dr_re(1'b0), .dr_addr('0), .dr_rdata(), .dr_ready(),
        .lk_req(lk_req), .lk_op(lk_op), .lk_id(lk_id), .lk_val(lk_val), .lk_gnt(lk_gnt)
    );

    // The single-tile lock unit: 64 six-bit semaphores, all 0 when a job starts. A request is
    // granted in its own cycle (ACQ when the value suffices, REL always, saturating at 63),
    // as the golden model assumes.
    logic       dm_ready;
    logic       lk_req, lk_op, lk_gnt;
    logic [5:0] lk_id, lk_val;
    logic [5:0] lockv [64];
    logic [6:0] lk_sum;
    assign lk_gnt = lk_req & (lk_op | (lockv[lk_id] >= lk_val));
    assign lk_sum = {1'b0, lockv[lk_id]} + {1'b0, lk_val};
    always_ff @(posedge clk) begin
        if (state == S_START) begin
            for (int i = 0; i < 64; i++) lockv[i] <= 6'd0;
        end else if (lk_gnt) begin
            lockv[lk_id] <= lk_op ? (lk_sum > 7'd63 ? 6'd63 : lk_sum[5:0]) : lockv[lk_id] - lk_val;
        end
    end

    // Bulk images.
    logic [63:0]          pm_img [PMEM_WORDS];
    logic [WORD_BITS-1:0] dm_img [DMEM_WORDS];

    string dir;
    initial begin
        if (!$value$plusargs("TW_DIR=%s", dir)) dir = ".";
    end

    state_t               state = S_RESET;
    logic [31:0]          idx = '0;
    logic                 reset_cmd = 1'b0;
    logic                 seen_not_done = 1'b0;
    // Read pipeline of DUMP_DM: the tile samples (dm_re, dm_addr) at one edge and presents
    // dm_rdata after it, so the harness captures it one edge later.
    logic                 rd_valid = 1'b0;
    logic [ADDR_BITS-1:0] rd_addr = '0;

    initial begin
        cmd_done = 1'b0;
        bad_cmd = 1'b0;
        timed_out = 1'b0;
        run_cycles = '0;
    end

    always @(posedge clk) begin
        pm_we <= 1'b0;
        dm_we <= 1'b0;
        dm_re <= 1'b0;
        start <= 1'b0;
        rd_valid <= dm_re;
        rd_addr <= dm_addr;
        if (rd_valid) dm_img[rd_addr] <= dm_rdata;

        case (state)
            S_RESET: begin
                rst <= 1'b1;
                idx <= idx + 1;
                if (idx == 3) begin
                    rst <= 1'b0;
                    idx <= '0;
                    if (reset_cmd) begin
                        reset_cmd <= 1'b0;
                        cmd_done <= 1'b1;
                        state <= S_ACK;
                    end else begin
                        state <= S_IDLE;
                    end
                end
            end
            S_IDLE: begin
                if (cmd_valid && !cmd_done) begin
                    idx <= '0;
                    bad_cmd <= 1'b0;
                    case (cmd)
                        CMD_LOAD_PM: begin
                            $readmemh($sformatf("%s/job%0d/pm.hex", dir, job), pm_img);
                            state <= S_LOAD_PM;
                        end
                        CMD_LOAD_DM: begin
                            $readmemh($sformatf("%s/job%0d/dm.hex", dir, job), dm_img);
                            state <= S_LOAD_DM;
                        end
                        CMD_START: begin
                            timed_out <= 1'b0;
                            state <= S_START;
                        end
                        CMD_DUMP_DM: state <= S_DUMP;
                        CMD_RESET: begin
                            reset_cmd <= 1'b1;
                            state <= S_RESET;
                        end
                        default: begin
                            bad_cmd <= 1'b1;
                            cmd_done <= 1'b1;
                            state <= S_ACK;
                        end
                    endcase
                end
            end
            S_LOAD_PM: begin
                pm_we <= 1'b1;
                pm_addr <= idx[PC_BITS-1:0];
                pm_wdata <= pm_img[idx];
                idx <= idx + 1;
                if (idx == PMEM_WORDS - 1) begin
                    cmd_done <= 1'b1;
                    state <= S_ACK;
                end
            end
            S_LOAD_DM: begin
                dm_we <= 1'b1;
                dm_addr <= idx[ADDR_BITS-1:0];
                dm_wdata <= dm_img[idx];
                idx <= idx + 1;
                if (idx == DMEM_WORDS - 1) begin
                    cmd_done <= 1'b1;
                    state <= S_ACK;
                end
            end
            S_DUMP: begin
                dm_re <= 1'b1;
                dm_addr <= idx[ADDR_BITS-1:0];
                idx <= idx + 1;
                if (idx == DMEM_WORDS - 1) begin
                    idx <= '0;
                    state <= S_DUMP_DRAIN;
                end
            end
            S_DUMP_DRAIN: begin
                idx <= idx + 1;
                if (idx == 2) begin
                    $writememh($sformatf("%s/job%0d/dm_out.hex", dir, job), dm_img);
                    cmd_done <= 1'b1;
                    state <= S_ACK;
                end
            end
            S_START: begin
                start <= 1'b1;
                run_cycles <= '0;
                seen_not_done <= 1'b0;
                state <= S_RUN;
            end
            S_RUN: begin
                run_cycles <= run_cycles + 1;
                if (!done) seen_not_done <= 1'b1;
                if (seen_not_done && done) begin
                    cmd_done <= 1'b1;
                    state <= S_ACK;
                end else if (run_cycles >= timeout_cycles) begin
                    timed_out <= 1'b1;
                    cmd_done <= 1'b1;
                    state <= S_ACK;
                end
            end
            S_ACK: begin
                if (!cmd_valid) begin
                    cmd_done <= 1'b0;
                    state <= S_IDLE;
                end
            end
            default: state <= S_IDLE;
        endcase
    end
endmodule
